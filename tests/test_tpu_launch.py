"""launch/tpu.py against a stand-in gcloud (tests/fake_gcloud): the gcloud calls it makes, a pod of 2
workers (local processes) that trains like one process, Ctrl-C that saves, a dead worker that ends the
run, and one-line answers to user mistakes."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from processes import spawn_jaxlm

from jaxlm.metrics import SPEED_KEYS

FAKE = os.path.join(ROOT, "tests", "fake_gcloud")
TPU = os.path.join(ROOT, "launch", "tpu.py")
ZONE = "us-east5-a"
TRAIN = ["train", "--config=tests/tiny.py", "--config.mesh.data=2", "--config.train.eval_every=10",
         "--config.train.checkpoint_every=10", "--config.train.log_every=1"]
STEPS = 30
REMOTE_SETUP = ("mkdir -p ~/jaxlm && tar -xzf ~/jaxlm-src.tar.gz -C ~/jaxlm && cd ~/jaxlm && "
                "{ command -v python3.11 >/dev/null || { sudo apt-get -qq update && sudo apt-get -qq install -y "
                "python3.11-venv; }; } && python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'")
PIDS = "pid=$(cat ~/.jaxlm-run.pid 2>/dev/null) && grep -qa jaxlm /proc/$pid/cmdline 2>/dev/null && kill -{} $pid; true"


class Pod:
  """A stand-in gcloud's state folder, and tpu.py run against it."""

  def __init__(self, state, name="pod"):
    self.state, self.name = state, name
    self.env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
    self.env.update(PATH=f"{FAKE}:{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(state),
                    FAKE_WORKER_PATH=os.path.join(FAKE, "worker"), FAKE_WORKER_PYTHON=sys.executable)

  def flags(self, subcommand, *more):
    return [subcommand, f"--name={self.name}", f"--zone={ZONE}", *more]

  def tpu(self, *args, timeout=60):
    """tpu.py ARGS to the end: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, TPU, *args], env=self.env, cwd=self.state, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr

  def start(self, *args):
    """tpu.py ARGS in the background, its output in files; (process, read(stream) of those files)."""
    out, err = open(self.state / "launcher.out", "w"), open(self.state / "launcher.err", "w")
    with out, err:
      proc = subprocess.Popen([sys.executable, TPU, *args], env=self.env, cwd=self.state, stdout=out, stderr=err)
    return proc, lambda stream: (self.state / f"launcher.{stream}").read_text()

  def calls(self):
    path = self.state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def home(self, worker):
    return self.state / self.name / f"worker-{worker}"

  def jaxlm_pid(self, worker):
    """The pid of worker's jaxlm if it runs, else None."""
    path = self.home(worker) / ".jaxlm-run.pid"
    if not path.exists():
      return None
    pid = int(path.read_text())
    try:
      return pid if b"jaxlm" in open(f"/proc/{pid}/cmdline", "rb").read() else None
    except FileNotFoundError:
      return None

  def kill_leftovers(self):
    """SIGKILL to any jaxlm a failed test left on a worker (by its pid, never by name)."""
    for worker in range(2):
      if pid := self.jaxlm_pid(worker):
        os.kill(pid, signal.SIGKILL)


def ok(result):
  code, out, err = result
  assert code == 0, err[-3000:]
  return out, err


def gcloud(*words):
  return ["compute", "tpus", *words]


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
  """A fake pod of 2 workers, created and set up through tpu.py."""
  pod = Pod(tmp_path_factory.mktemp("gcloud"))
  ok(pod.tpu(*pod.flags("create", "--accelerator=v5p-16")))
  ok(pod.tpu(*pod.flags("setup")))
  yield pod
  pod.kill_leftovers()


@pytest.fixture(scope="module")
def trained(pod, tmp_path_factory):
  """A 30-step run through `tpu.py run` on the pod, and the same config as one process of 2 devices."""
  workdir = tmp_path_factory.mktemp("pod-run") / "w"
  logs = workdir.parent / "logs"
  out, err = ok(pod.tpu(*pod.flags("run", f"--logs={logs}"), "--", *TRAIN, f"--config.train.steps={STEPS}",
                        f"--workdir={workdir}", timeout=300))
  reference = tmp_path_factory.mktemp("one-process") / "w"
  (proc,) = spawn_jaxlm([*TRAIN, f"--config={ROOT}/tests/tiny.py", f"--config.train.steps={STEPS}",
                         f"--workdir={reference}"], devices=2)
  _, reference_err = proc.communicate(timeout=300)
  assert proc.returncode == 0, reference_err[-3000:]
  return workdir, logs, reference, out


def metrics(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for m in lines:
    for key in SPEED_KEYS:  # wall-clock speed, the one thing allowed to differ
      m.pop(key, None)
  return lines


def saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def test_create_setup_run_status_delete_make_these_gcloud_calls(tmp_path):
  pod = Pod(tmp_path)
  ok(pod.tpu(*pod.flags("create", "--accelerator=v5litepod-16")))
  ok(pod.tpu(*pod.flags("setup")))
  args = ["--version", "it's one 'arg'"]  # (jaxlm --version ignores the rest; the quoting is checked below)
  out, err = ok(pod.tpu(*pod.flags("run", f"--logs={tmp_path / 'logs'}"), "--", *args))
  status, _ = ok(pod.tpu(*pod.flags("status")))
  ok(pod.tpu(*pod.flags("delete")))
  remote = ("cd ~/jaxlm && echo $$ > ~/.jaxlm-run.pid && exec env JAXLM_DISTRIBUTED=auto "
            f"~/jaxlm/.venv/bin/jaxlm {shlex.join(args)}")
  describe = gcloud("tpu-vm", "describe", "pod", f"--zone={ZONE}", "--format=json")
  calls = pod.calls()
  calls[4:6] = sorted(calls[4:6])  # (the workers' ssh start together, in any order)
  archive = calls[1][4]  # in a folder of its own (two setups at once never share it), removed afterwards
  assert re.fullmatch(r"/tmp/jaxlm-src-[^/]+/pod\.tar\.gz", archive) and not os.path.exists(os.path.dirname(archive))
  calls[1][4] = "ARCHIVE"
  assert calls == [
      gcloud("tpu-vm", "create", "pod", f"--zone={ZONE}", "--accelerator-type=v5litepod-16",
             "--version=v2-alpha-tpuv5-lite"),
      gcloud("tpu-vm", "scp", "ARCHIVE", "pod:~/jaxlm-src.tar.gz", f"--zone={ZONE}", "--worker=all"),
      gcloud("tpu-vm", "ssh", "pod", f"--zone={ZONE}", "--worker=all", f"--command={REMOTE_SETUP}"),
      describe,
      *[gcloud("tpu-vm", "ssh", "pod", f"--zone={ZONE}", f"--worker={i}", f"--command={remote}") for i in range(2)],
      describe,
      ["alpha", *gcloud("queued-resources", "describe", "pod", f"--zone={ZONE}", "--format=json")],
      gcloud("tpu-vm", "delete", "pod", f"--zone={ZONE}", "--quiet")]
  assert shlex.split(remote.split("/.venv/bin/jaxlm ", 1)[1]) == args
  assert status == f"pod ({ZONE}): READY, v5litepod-16, 2 workers, runtime v2-alpha-tpuv5-lite\n"
  for i in range(2):  # setup unpacked the checkout's files into ~/jaxlm and pip-installed it there
    home = pod.home(i)
    assert (home / "jaxlm" / "launch" / "tpu.py").read_bytes() == open(TPU, "rb").read()
    assert not (home / "jaxlm" / ".git").exists()
    assert (home / "jaxlm" / ".venv" / "pip-calls").read_text() == f"{home / 'jaxlm'} install -q -e .[tpu]\n"
    assert (tmp_path / "logs" / f"worker-{i}.log").read_text().startswith("jaxlm 0.1.0 (jax ")
  assert out.startswith("jaxlm 0.1.0 (jax ")  # worker 0's output, on the terminal too


def test_spot_makes_a_queued_resource_that_delete_removes(tmp_path):
  pod = Pod(tmp_path)
  _, err = ok(pod.tpu(*pod.flags("create", "--accelerator=v6e-16", "--spot")))
  ok(pod.tpu(*pod.flags("delete")))
  queued = lambda verb, *flags: ["alpha", *gcloud("queued-resources", verb, "pod", f"--zone={ZONE}", *flags)]
  assert pod.calls() == [
      queued("create", "--node-id=pod", "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--spot"),
      queued("describe", "--format=json"),
      queued("describe", "--format=json"),
      queued("delete", "--force", "--quiet")]
  assert "queued resource pod is ACTIVE" in err
  assert json.loads((tmp_path / "state.json").read_text()) == {"nodes": {}, "queued": {}}


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
  pod = Pod(tmp_path)
  printed = {}
  for subcommand, more in [("create", ["--accelerator=v5p-16", "--reserved"]), ("setup", []),
                           ("run", ["--workers=2", "--", "train", "--workdir=gs://b/r x"]),
                           ("status", []), ("delete", ["--queued"])]:
    out, _ = ok(pod.tpu(*pod.flags(subcommand, "--dry_run", *more)))
    printed[subcommand] = [shlex.split(line, comments=True) for line in out.splitlines() if not line.startswith("#")]
  assert pod.calls() == [] and sorted(os.listdir(tmp_path)) == []
  remote = ("cd ~/jaxlm && echo $$ > ~/.jaxlm-run.pid && exec env JAXLM_DISTRIBUTED=auto "
            "~/jaxlm/.venv/bin/jaxlm train '--workdir=gs://b/r x'")
  assert printed == {
      "create": [["gcloud", "alpha", *gcloud("queued-resources", "create", "pod", f"--zone={ZONE}", "--node-id=pod",
                                             "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
                                             "--reserved")],
                 ["gcloud", "alpha", *gcloud("queued-resources", "describe", "pod", f"--zone={ZONE}", "--format=json")]],
      "setup": [["gcloud", *gcloud("tpu-vm", "scp", "/tmp/jaxlm-src-XXXXXXXX/pod.tar.gz", "pod:~/jaxlm-src.tar.gz",
                                   f"--zone={ZONE}", "--worker=all")],
                ["gcloud", *gcloud("tpu-vm", "ssh", "pod", f"--zone={ZONE}", "--worker=all", f"--command={REMOTE_SETUP}")]],
      "run": [["gcloud", *gcloud("tpu-vm", "ssh", "pod", f"--zone={ZONE}", f"--worker={i}", f"--command={remote}")]
              for i in range(2)],
      "status": [["gcloud", *gcloud("tpu-vm", "describe", "pod", f"--zone={ZONE}", "--format=json")]],
      "delete": [["gcloud", "alpha", *gcloud("queued-resources", "delete", "pod", f"--zone={ZONE}", "--force",
                                             "--quiet")]]}


def test_two_workers_train_like_one_process_of_two_devices(pod, trained):
  workdir, logs, reference, out = trained
  # Bit for bit: the same program on a mesh of 2 devices; the only sum across them (the gradient and
  # loss all-reduce) has two terms, and a + b == b + a in floating point, in-process or over Gloo.
  assert metrics(workdir) == metrics(reference)
  assert [m["step"] for m in metrics(workdir) if "loss" in m] == list(range(1, STEPS + 1))
  assert saved_steps(workdir) == [10, 20, 30]
  assert sorted(os.listdir(workdir / "checkpoints" / "30" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert f"step     {STEPS}/{STEPS}" in out and (logs / "worker-1.log").exists()
  assert (pod.home(0) / "jaxlm" / "jaxlm" / "__pycache__").is_dir()  # the workers ran setup's copy


def wait_for_training(workdir, launcher, output):
  deadline = time.monotonic() + 180
  while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().strip()):
    assert launcher.poll() is None and time.monotonic() < deadline, output("err")[-3000:]
    time.sleep(0.05)


def test_ctrl_c_saves_a_checkpoint_on_every_worker_and_exits_0(pod, tmp_path):
  workdir = tmp_path / "w"
  launcher, output = pod.start(*pod.flags("run", f"--logs={tmp_path / 'logs'}"), "--", *TRAIN,
                               "--config.train.steps=1000000", f"--workdir={workdir}")
  try:
    wait_for_training(workdir, launcher, output)
    launcher.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = launcher.wait(timeout=120)
    seconds = time.monotonic() - sent
  finally:
    launcher.kill()
  print(f"\nSIGINT to `tpu.py run` -> launcher exit: {seconds:.1f} s")
  assert code == 0, output("err")[-3000:]
  stopped = int(re.search(r"after step (\d+); checkpoint saved", output("out")).group(1))
  assert saved_steps(workdir)[-1] == stopped and max(m["step"] for m in metrics(workdir)) == stopped
  data = workdir / "checkpoints" / str(stopped) / "data"
  for i in range(2):  # one checkpoint, saved by both workers at the same step
    assert json.loads((data / f"process_{i}-of-2.json").read_text())["step"] == stopped
    log = (tmp_path / "logs" / f"worker-{i}.log").read_text()
    assert "SIGTERM" in log, log[-2000:]
    assert pod.jaxlm_pid(i) is None
  assert "tpu: SIGINT: asking jaxlm on every worker to save a checkpoint and stop" in output("err")


def test_a_dead_worker_ends_the_run_on_every_worker_and_is_named(pod, tmp_path):
  workdir = tmp_path / "w"
  launcher, output = pod.start(*pod.flags("run", f"--logs={tmp_path / 'logs'}"), "--", *TRAIN,
                               "--config.train.steps=1000000", f"--workdir={workdir}")
  try:
    wait_for_training(workdir, launcher, output)
    pids = [pod.jaxlm_pid(i) for i in range(2)]
    os.kill(pids[1], signal.SIGKILL)
    code = launcher.wait(timeout=60)
  finally:
    launcher.kill()
  assert code == 255, output("err")[-3000:]  # ssh's code for a command killed by a signal
  assert (f"tpu: worker 1 of 2 exited with code 255 (its log: {tmp_path / 'logs'}/worker-1.log); ending the run "
          "on every worker") in output("err")
  assert all(not os.path.exists(f"/proc/{pid}") for pid in pids), "a worker's jaxlm is still there"


@pytest.mark.parametrize("args, message", [
    (["create", f"--zone={ZONE}", "--accelerator=v5p-16"], "the following arguments are required: --name"),
    (["setup", "--name=pod"], "the following arguments are required: --zone"),
    (["launch", "--name=pod", f"--zone={ZONE}"], "argument COMMAND: invalid choice: 'launch'"),
    ([], "the following arguments are required: COMMAND"),
    (["run", "--name=pod", f"--zone={ZONE}"], "run needs a jaxlm command after --"),
    (["run", "--name=pod", f"--zone={ZONE}", "--"], "run needs a jaxlm command after --"),
    (["run", "--name=pod", f"--zone={ZONE}", "--dry_run", "--", "train"], "run --dry_run needs --workers=N"),
    (["run", "--name=pod", f"--zone={ZONE}", "--", "train", "--dry_run"], "--dry_run after -- would go to jaxlm"),
    (["create", "--name=pod", f"--zone={ZONE}", "--accelerator=v9x-8"], "no default runtime for --accelerator=v9x-8"),
    (["create", "--name=pod", f"--zone={ZONE}", "--accelerator=v5p-8", "--spot", "--reserved"],
     "argument --reserved: not allowed with argument --spot"),
    (["status", "--name=nope", f"--zone={ZONE}"], "gcloud cannot describe 'nope' in zone 'us-east5-a': ERROR: "
     "(gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND"),
    (["delete", "--name=pod", f"--zone={ZONE}", "--", "x"], "only run takes a command after --"),
])
def test_a_user_mistake_is_one_line_and_exit_code_2(tmp_path, args, message):
  code, out, err = Pod(tmp_path).tpu(*args)
  assert (code, out) == (2, "") and err.startswith(f"tpu: error: {message}") and err.count("\n") == 1, err
