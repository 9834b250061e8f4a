"""Killed, preempted or interrupted runs continue exactly: fresh `jaxlm train` processes on one workdir.

Each reference is an uninterrupted run of the same command. A restart must reproduce every line of its
metrics.jsonl (tokens_per_sec aside) and its final parameters and optimizer state, bit for bit.
"""

import json
import os
import random
import re
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT
from processes import spawn_jaxlm

from jaxlm import preemption
from jaxlm.metrics import SPEED_KEYS

STEPS = 120
RUN = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=10",
       "--config.train.eval_every=30", "--config.train.log_every=1"]
MESHES = {  # name -> (devices in the process, mesh overrides)
    "1 device": (1, ["--config.mesh.data=1"]),
    "2x2x2": (8, ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]),
    "2 processes x 2 devices": (2, ["--config.mesh.data=2", "--config.mesh.fsdp=2"]),
}
PROCESSES = {"2 processes x 2 devices": 2}


def start(workdir, mesh, *overrides):
  """`jaxlm train` in fresh processes (several: a local JAX distributed run); returns them."""
  devices, mesh_overrides = MESHES[mesh]
  workdir.mkdir(parents=True, exist_ok=True)

  def outputs(i):  # files, not pipes: nobody reads them while the run goes on
    suffix = "" if i == 0 else f".{i}"
    return (open(workdir.parent / f"{workdir.name}.out{suffix}", "a"),  # noqa: SIM115 (the child holds it)
            open(workdir.parent / f"{workdir.name}.err{suffix}", "a"))  # noqa: SIM115
  return spawn_jaxlm(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={workdir}", *RUN,
                      *mesh_overrides, *overrides], devices=devices, processes=PROCESSES.get(mesh, 1),
                     outputs=outputs)


def output(workdir):
  return ((workdir.parent / f"{workdir.name}.out").read_text(),
          (workdir.parent / f"{workdir.name}.err").read_text())


def finish(workdir, mesh, *overrides):
  for proc in start(workdir, mesh, *overrides):
    assert proc.wait(timeout=300) == 0, output(workdir)[1][-3000:]


def metrics(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for m in lines:
    for key in SPEED_KEYS:  # wall-clock speed, the one thing allowed to differ
      m.pop(key, None)
  return lines


def interrupt_at(workdir, mesh, step, sig, *overrides, to_process=0):
  """Starts a run and sends `sig` to one of its processes once metrics.jsonl reaches `step`.

  Returns (exit codes, seconds until all exited).
  """
  procs = start(workdir, mesh, *overrides)
  path = workdir / "metrics.jsonl"
  while all(p.poll() is None for p in procs):
    if path.exists() and any(f'"step": {s},' in path.read_text() for s in range(step, STEPS + 1)):
      sent = time.monotonic()
      procs[to_process].send_signal(sig)
      codes = [p.wait(timeout=120) for p in procs]
      return codes, time.monotonic() - sent
    time.sleep(0.002)
  pytest.fail(f"the run ended before step {step}: {output(workdir)[1][-2000:]}")


def saved_arrays(workdir, step=STEPS):
  """Every array of the saved TrainState (params, optimizer state, step, RNG) as numpy."""
  directory = f"{workdir}/checkpoints/{step}/state"  # (a folder or a gs:// URL)
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(directory).item_metadata.tree
    args = ocp.args.PyTreeRestore(restore_args=jax.tree.map(  # as numpy, whatever mesh saved it
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    restored = checkpointer.restore(directory, args=args)
  return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def assert_same_run(workdir, reference, steps=STEPS):
  assert metrics(workdir) == metrics(reference)
  ours, theirs = saved_arrays(workdir, steps), saved_arrays(reference, steps)
  assert ours.keys() == theirs.keys()
  for name in theirs:
    assert np.array_equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted runs, one per mesh, computed once."""
  runs = {}

  def get(mesh):
    if mesh not in runs:
      runs[mesh] = tmp_path_factory.mktemp("reference") / "w"
      finish(runs[mesh], mesh)
    return runs[mesh]
  return get


@pytest.mark.parametrize("mesh", ["1 device", "2x2x2"])
def test_sigkill_at_a_random_step_then_restart_equals_an_uninterrupted_run(reference, tmp_path, mesh):
  kill_step = random.Random(f"sigkill {mesh}").randint(15, 95)
  workdir = tmp_path / "w"
  codes, _ = interrupt_at(workdir, mesh, kill_step, signal.SIGKILL)
  assert codes == [-signal.SIGKILL]
  saved = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert saved and saved[-1] < STEPS  # it really died mid-run
  finish(workdir, mesh)
  out, _ = output(workdir)
  assert re.search(rf"resumed from {workdir}/checkpoints/(\d+)", out)
  assert_same_run(workdir, reference(mesh))


def test_sigterm_saves_at_the_current_step_exits_0_and_resumes_exactly(reference, tmp_path):
  workdir = tmp_path / "w"
  codes, seconds = interrupt_at(workdir, "1 device", 43, signal.SIGTERM)
  out, err = output(workdir)
  assert codes == [0], err[-2000:]
  assert seconds < 30, "a scheduler's grace period is typically 30 s"
  stopped = int(re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved", out).group(1))
  assert 43 <= stopped < STEPS
  assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())[-1] == stopped
  assert max(m["step"] for m in metrics(workdir)) == stopped
  assert "SIGTERM received: finishing this step, then saving a checkpoint" in err
  finish(workdir, "1 device")
  assert f"resumed from {workdir}/checkpoints/{stopped}" in output(workdir)[0]
  assert_same_run(workdir, reference("1 device"))


TWO, TWO_STEPS = "2 processes x 2 devices", 40


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory):
  """An uninterrupted 2-process run of TWO_STEPS steps."""
  uninterrupted = tmp_path_factory.mktemp("reference-2p") / "w"
  finish(uninterrupted, TWO, f"--config.train.steps={TWO_STEPS}")
  return uninterrupted


def test_with_two_processes_sigterm_to_one_stops_both_at_the_same_step(two_process_reference, tmp_path):
  """Only process 1 gets the signal; the processes agree (through JAX's preemption service), save one
  checkpoint together, exit 0."""
  mesh, steps = TWO, TWO_STEPS
  workdir = tmp_path / "w"
  codes, seconds = interrupt_at(workdir, mesh, 13, signal.SIGTERM, f"--config.train.steps={steps}",
                                to_process=1)
  out, err = output(workdir)
  assert codes == [0, 0], err[-2000:]
  stopped = int(re.search(r"stopped by a signal to another process after step (\d+)", out).group(1))
  assert 13 <= stopped < steps and seconds < 30
  data = workdir / "checkpoints" / str(stopped) / "data"
  assert sorted(os.listdir(data)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  for i in range(2):
    assert json.loads((data / f"process_{i}-of-2.json").read_text())["step"] == stopped
  finish(workdir, mesh, f"--config.train.steps={steps}")
  assert_same_run(workdir, two_process_reference, steps)


def test_a_stopped_process_ends_the_run_through_the_watchdog_with_stacks_and_the_rerun_resumes_exactly(
    two_process_reference, tmp_path):
  """SIGSTOP: process 1 freezes mid-run and process 0 waits for it in a collective. JAX would notice
  only after its heartbeat timeout (20 s here), and never for a hung process that still heartbeats;
  the step watchdog (train.step_timeout) ends process 0 with its stacks."""
  workdir, timeout = tmp_path / "w", 6
  flags = [f"--config.train.steps={TWO_STEPS}", f"--config.train.step_timeout={timeout}"]
  procs = start(workdir, TWO, *flags)
  sealed = workdir / "checkpoints" / "10" / "jaxlm-manifest.json"  # (committed only once both processes wrote it)
  while not sealed.exists():
    assert all(p.poll() is None for p in procs), output(workdir)[1][-2000:]
    time.sleep(0.002)
  procs[1].send_signal(signal.SIGSTOP)
  stopped = time.monotonic()
  code = procs[0].wait(timeout=120)
  seconds = time.monotonic() - stopped
  procs[1].kill()
  procs[1].wait()
  err = output(workdir)[1]
  assert code == 3, err[-3000:]
  line = next(x for x in err.splitlines() if x.startswith("jaxlm: error:"))
  assert re.fullmatch(rf"jaxlm: error: no progress for \d+ s in step \d+ \(train.step_timeout={timeout}\): a process "
                      r"of the run is stuck or stopped; the stacks of this process's threads follow; run the same "
                      r"command again to resume from the last checkpoint", line), line
  after = err[err.index(line):]
  assert "(most recent call first)" in after and 'File "' in after and "jaxlm/loop.py" in after
  assert timeout < seconds < timeout + 10  # (the watchdog looks once a second)
  saved = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert saved and saved[-1] < TWO_STEPS
  finish(workdir, TWO, *flags)
  assert f"resumed from {workdir}/checkpoints/{saved[-1]}" in output(workdir)[0]
  assert_same_run(workdir, two_process_reference, TWO_STEPS)


def test_a_second_sigint_aborts_at_once(monkeypatch, capsys):
  exits = []
  monkeypatch.setattr(preemption.os, "_exit", exits.append)  # (the real one would end pytest)
  with preemption.StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # Python runs handlers between bytecodes
    assert signals.received == "SIGINT" and exits == []
    assert preemption.stop_requested(signals, 0)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
  assert exits == [130]
  err = capsys.readouterr().err
  assert "SIGINT received: finishing this step" in err and "second SIGINT: aborting without saving" in err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on exit


@pytest.mark.parametrize("objective", ["mlm", "span"])
def test_a_killed_run_of_another_objective_restarts_bit_for_bit(tmp_path, objective):
  """Masks and noise spans are drawn from (seed, step, row): a restart draws the ones the killed run
  would have (a masked LM's encoder; span corruption's encoder-decoder)."""
  flag = f"--config.objective={objective}"
  uninterrupted = tmp_path / "reference"
  finish(uninterrupted, "1 device", flag)
  workdir = tmp_path / "w"
  at = random.Random(f"sigkill {objective}").randint(15, 95)
  codes, _ = interrupt_at(workdir, "1 device", at, signal.SIGKILL, flag)
  assert codes == [-signal.SIGKILL]
  finish(workdir, "1 device", flag)
  assert "resumed from" in output(workdir)[0]
  assert all("accuracy" in m for m in metrics(workdir) if "loss" in m)
  assert_same_run(workdir, uninterrupted)
