"""A process of a multi-process run that dies ends the others within a minute, each with one line naming
it; `launch/local.py` ends them at once, names who died and exits non-zero; rerunning resumes."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from processes import spawn_jaxlm

TRAIN = ["train", f"--config={ROOT}/tests/tiny.py", "--config.mesh.data=2", "--config.train.steps=1000000",
         "--config.train.checkpoint_every=20", "--config.train.eval_every=100000", "--config.train.log_every=10"]


def wait_for_a_checkpoint(workdir, procs, logs):
  deadline = time.monotonic() + 180
  while not (workdir / "checkpoints" / "20" / "jaxlm-manifest.json").exists():
    assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs()
    time.sleep(0.1)


def saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def files(tmp_path):
  return lambda i: (open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w"))  # noqa: SIM115


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_ends_the_other_within_a_minute_with_one_line(tmp_path, victim):
  workdir = tmp_path / "w"
  procs = spawn_jaxlm([*TRAIN, f"--workdir={workdir}"], devices=1, processes=2, outputs=files(tmp_path))
  wait_for_a_checkpoint(workdir, procs, lambda: (tmp_path / "err0").read_text()[-2000:])
  procs[victim].kill()
  killed = time.monotonic()
  survivor = 1 - victim
  code = procs[survivor].wait(timeout=120)
  seconds = time.monotonic() - killed
  procs[victim].wait()
  err = (tmp_path / f"err{survivor}").read_text()
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 3 and len(lines) == 1, err[-3000:]
  assert lines[0].startswith(f"jaxlm: error: lost process {victim}{' (the coordinator)' * (victim == 0)} of 2: "
                             "it exited or was killed")
  # Detection takes up to one heartbeat (JAXLM_HEARTBEAT_SECONDS, 20 s) when process 1 dies; the others
  # see process 0's service go at once.
  assert seconds < 60
  if victim == 1:  # the same command again resumes from the last checkpoint (and here, finishes)
    last = saved_steps(workdir)[-1]
    again = spawn_jaxlm([*TRAIN, f"--workdir={workdir}", f"--config.train.steps={last + 3}"], devices=1,
                        processes=2)
    outputs = [p.communicate(timeout=180) for p in again]
    assert [p.returncode for p in again] == [0, 0], outputs[0][1][-2000:]
    assert f"resumed from {workdir}/checkpoints/{last}" in outputs[0][0]
    assert saved_steps(workdir)[-1] == last + 3


def test_the_launcher_ends_the_others_when_one_dies_and_names_it(tmp_path):
  workdir = tmp_path / "w"
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
  with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
    launcher = subprocess.Popen([sys.executable, f"{ROOT}/launch/local.py", "--processes=2", "--devices=1", "--",
                                 *TRAIN, f"--workdir={workdir}"], cwd=tmp_path, env=env, stdout=out, stderr=err)
  wait_for_a_checkpoint(workdir, [launcher], lambda: (tmp_path / "err").read_text()[-2000:])
  children = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                             text=True).stdout.split()]
  index = {pid: re.search(rb"JAX_PROCESS_ID=(\d+)", open(f"/proc/{pid}/environ", "rb").read()).group(1)
           for pid in children}
  victim = next(pid for pid, i in index.items() if i == b"1")
  os.kill(victim, signal.SIGKILL)
  killed = time.monotonic()
  code = launcher.wait(timeout=60)
  seconds = time.monotonic() - killed
  assert code == 128 + signal.SIGKILL and seconds < 15  # at once: a SIGTERM, a SIGKILL 5 s later at most
  assert (f"launch: process 1 of 2 was killed by SIGKILL (its log: {workdir}/logs/launch-1.log); ending the "
          "others") in (tmp_path / "err").read_text()
  for pid in children:
    assert not os.path.exists(f"/proc/{pid}"), "a process of the run is still there"
  assert (workdir / "logs" / "launch-1.log").exists() and not list(tmp_path.glob("launch-*.log"))


def test_a_coordinator_counts_as_reachable_only_when_it_answers(monkeypatch):
  """A SIGKILLed process 0's listening socket outlives its threads for a while and still takes
  connections: only an answer to the HTTP/2 hello counts (a live gRPC server sends its SETTINGS)."""
  import socket
  import threading

  from jax._src import distributed

  from jaxlm import peers

  def reachable(port):
    monkeypatch.setattr(distributed.global_state, "coordinator_address", f"127.0.0.1:{port}")
    return peers._coordinator_reachable()

  with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, accepts nothing: a dying process
    port = silent.getsockname()[1]
    started = time.monotonic()
    assert not reachable(port)
    assert 5 < time.monotonic() - started < 10  # three tries of 2 s
  started = time.monotonic()
  assert not reachable(port) and time.monotonic() - started < 1  # closed: refused at once

  with socket.create_server(("127.0.0.1", 0)) as server:
    def answer():
      connection, _ = server.accept()
      connection.recv(64)
      connection.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
      connection.close()

    threading.Thread(target=answer, daemon=True).start()
    assert reachable(server.getsockname()[1])
