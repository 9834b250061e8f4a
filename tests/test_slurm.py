"""launch/slurm.py: the sbatch script it writes (dry run), one-line answers to user mistakes, the call
of a stand-in sbatch, the requeue at the time limit (the script under bash with stand-in srun, scancel
and scontrol); and a run in the environment srun gives its tasks, which JAX's own SLURM detection
forms into one run with the losses of a single process."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from processes import free_port, spawn_jaxlm

from jaxlm.metrics import SPEED_KEYS

SLURM = os.path.join(ROOT, "launch", "slurm.py")
TRAIN = ["train", f"--config={ROOT}/tests/tiny.py", "--config.mesh.data=2", "--config.train.steps=30",
         "--config.train.eval_every=10", "--config.train.checkpoint_every=10", "--config.train.log_every=1"]


def slurm(*args, cwd=ROOT, path=None):
  """launch/slurm.py ARGS: (exit code, stdout, stderr)."""
  env = dict(os.environ, PATH=f"{path}:{os.environ['PATH']}") if path else None
  done = subprocess.run([sys.executable, SLURM, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=60)
  return done.returncode, done.stdout, done.stderr


def executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
  workdir = tmp_path / "run"
  command = ["train", "--config=configs/default.py", f"--workdir={workdir}", "--config.train.sample_prompt=Once upon"]
  code, out, err = slurm("--nodes=2", "--gpus_per_node=8", "--time=04:00:00", "--partition=gpu", "--port=23456",
                         "--setup=source /opt/venv/bin/activate", "--dry_run", "--", *command)
  assert code == 0, err
  lines = out.splitlines()
  logs = f"{workdir}/logs"
  for option in ["--job-name=jaxlm", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                 "--time=04:00:00", "--partition=gpu", "--signal=TERM@300", "--requeue", "--open-mode=append",
                 f"--output={logs}/%x-%j.log", f"--chdir={ROOT}"]:
    assert f"#SBATCH {option}" in lines
  for line in ["export JAXLM_DISTRIBUTED=auto", "export JAX_COORDINATOR_PORT=23456", "source /opt/venv/bin/activate",
               "unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID JAX_LOCAL_DEVICE_IDS"]:
    assert line in lines
  (srun,) = [line for line in lines if line.startswith("srun ")]
  words = shlex.split(srun)
  assert words[:words.index("jaxlm")] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none", "--cpus-per-task=8",
                                          "--open-mode=append", f"--output={logs}/%x-%j-%t.log"]
  assert words[words.index("jaxlm") + 1:] == command  # (quoted: the prompt stays one argument)
  assert "'--config.train.sample_prompt=Once upon'" in srun
  assert lines[-1] == f"(dry run: would write {logs}/jaxlm.sbatch and run: sbatch {logs}/jaxlm.sbatch)"
  assert not workdir.exists()


@pytest.mark.parametrize("args, message", [
    (["--nodes=0", "--time=10", "--", "train"], "--nodes=0: need at least 1"),
    (["--time=10", "--"], "no jaxlm command: give it after --"),
    (["--time=10"], "no jaxlm command: give it after --"),
    (["--time=4h", "--", "train"], "--time='4h' is not a SLURM time limit"),
    (["--time=5", "--", "train"], "--stop_before=300 s is not shorter than --time=5 (300 s)"),
    (["--time=10", "--job_name=my run", "--", "train"], "--job_name='my run': use letters"),
    (["--time=10", "--gpus=8", "--", "train"], "unrecognized arguments: --gpus=8"),
    (["--time=10", "--extra=account=proj", "--", "train"], "--extra=account=proj: give an sbatch option"),
])
def test_a_user_mistake_is_one_line_and_exit_2(args, message):
  code, out, err = slurm("--dry_run", *args)
  assert code == 2 and out == "" and len(err.splitlines()) == 1, err
  assert err.startswith(f"slurm: error: {message}")


def test_the_script_goes_to_the_logs_folder_and_to_sbatch(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  executable(fake / "sbatch", f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\necho "Submitted batch job 42"\n')
  flags = ["--nodes=2", "--time=1-00:00:00", "--job_name=big"]
  command = ["--", "train", "--config=tests/tiny.py", "--workdir=runs/big"]
  code, out, err = slurm(*flags, *command, cwd=tmp_path, path=fake)
  assert code == 0, err
  script = tmp_path / "runs" / "big" / "logs" / "big.sbatch"
  assert (tmp_path / "argv").read_text().splitlines() == [str(script)]
  assert out.splitlines()[0] == "Submitted batch job 42"
  assert f"{script.parent}/big-42-<task>.log" in out
  dry = slurm(*flags, "--dry_run", *command, cwd=tmp_path)[1]
  assert script.read_text() == dry[:dry.rindex("\n(dry run")]


def test_without_sbatch_on_path_it_says_so_in_one_line(tmp_path):
  code, out, err = slurm("--time=10", "--sbatch=no-such-sbatch", "--", "train", cwd=tmp_path)
  assert code == 2 and err == ("slurm: error: no-such-sbatch is not on PATH (run this on the cluster's login "
                               "node, or --dry_run to see the script)\n")
  assert not (tmp_path / "slurm-logs").exists()


@pytest.fixture
def batch_shell(tmp_path):
  """Runs a --resubmit script under bash with stand-in srun, scancel, scontrol and jaxlm: the srun runs
  until SIGTERM (from scancel) or FAKE_SECONDS, then exits FAKE_EXIT. Returns start(**env) -> process."""
  fake = tmp_path / "bin"
  fake.mkdir()
  executable(fake / "srun", f'#!/bin/bash\necho $$ > {tmp_path}/srun.pid\ntrap \'echo saved; exit "$FAKE_EXIT"\' TERM\n'
             'for i in $(seq $((FAKE_SECONDS * 20))); do sleep 0.05; done\nexit "$FAKE_EXIT"\n')
  executable(fake / "scancel", f'#!/bin/sh\necho "scancel $*" >> {tmp_path}/calls\nkill -TERM $(cat {tmp_path}/srun.pid)\n')
  executable(fake / "scontrol", f'#!/bin/sh\necho "scontrol $*" >> {tmp_path}/calls\n')
  executable(fake / "jaxlm", "#!/bin/sh\n")
  dry = slurm("--time=10", "--resubmit", "--logs=logs", "--dry_run", "--", "train", cwd=tmp_path)[1]
  script = tmp_path / "job.sbatch"
  script.write_text(dry[:dry.rindex("\n(dry run")])

  def start(**env):
    path = f"{fake}:{env.pop('PATH', os.environ['PATH'])}"
    return subprocess.Popen(["bash", str(script)], env=dict(os.environ, PATH=path, SLURM_JOB_ID="42", **env),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return start


def calls(tmp_path):
  return (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []


def time_limit_signal(proc, tmp_path):
  """USR1 to the batch shell, as SLURM sends it --stop_before seconds before the limit."""
  deadline = time.monotonic() + 10
  while not (tmp_path / "srun.pid").exists():
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.02)
  proc.send_signal(signal.SIGUSR1)


@pytest.mark.parametrize("exit_on_term, requeued", [(0, True), (1, False)])
def test_resubmit_requeues_only_a_run_that_the_time_limit_stopped_cleanly(batch_shell, tmp_path, exit_on_term,
                                                                        requeued):
  proc = batch_shell(FAKE_SECONDS="30", FAKE_EXIT=str(exit_on_term))
  time_limit_signal(proc, tmp_path)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == exit_on_term
  assert calls(tmp_path) == ["scancel --signal=TERM 42"] + ["scontrol requeue 42"] * requeued
  assert "saved" in out


def test_resubmit_does_not_requeue_a_run_that_finished(batch_shell, tmp_path):
  proc = batch_shell(FAKE_SECONDS="0", FAKE_EXIT="0")
  assert proc.wait(timeout=30) == 0 and calls(tmp_path) == []


def test_the_script_stops_with_one_line_when_jaxlm_is_not_on_the_node(batch_shell, tmp_path):
  (tmp_path / "bin" / "jaxlm").unlink()
  proc = batch_shell(FAKE_SECONDS="0", FAKE_EXIT="0", PATH="/usr/bin:/bin")
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 2 and err.startswith("slurm: error: jaxlm is not on PATH on ")
  assert not (tmp_path / "srun.pid").exists()

# ---- JAX's SLURM detection


def metrics(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for m in lines:
    for key in SPEED_KEYS:  # wall-clock speed, the one thing allowed to differ
      m.pop(key, None)
  return lines


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: the same run as one process of 2 CPU devices."""
  workdir = tmp_path_factory.mktemp("one_process") / "w"
  (proc,) = spawn_jaxlm([*TRAIN, f"--workdir={workdir}"], devices=2)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return workdir


def srun_environment(task: int, tasks: int, port: int) -> dict[str, str]:
  """What srun sets for task `task` of a step of `tasks` tasks on one node (the variables JAX reads, and
  their usual company), with JAXLM_DISTRIBUTED=auto as the sbatch script sets it; none of the explicit
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, so that JAX's detection forms the run.
  The node list is `localhost` (SLURM would give the node's name, which the nodes resolve)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_")) and k != "TF_CPP_MIN_LOG_LEVEL"}
  node, count = "localhost", str(tasks)
  env.update(SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_JOB_NAME="jaxlm", SLURM_STEP_ID="0",
             SLURM_JOB_NODELIST=node, SLURM_NODELIST=node, SLURM_STEP_NODELIST=node, SLURMD_NODENAME=node,
             SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_STEP_NUM_NODES="1", SLURM_NODEID="0",
             SLURM_NTASKS=count, SLURM_NPROCS=count, SLURM_STEP_NUM_TASKS=count, SLURM_TASKS_PER_NODE=count,
             SLURM_STEP_TASKS_PER_NODE=count, SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
             JAXLM_DISTRIBUTED="auto", JAX_COORDINATOR_PORT=str(port), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return env


def test_slurm_environment_two_processes_detected_by_jax_same_losses_as_one_process(one_process, tmp_path):
  workdir, port = tmp_path / "w", free_port()
  procs = []
  try:
    for i in range(2):
      with open(tmp_path / f"out{i}", "w") as out, open(tmp_path / f"err{i}", "w") as err:
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *TRAIN, f"--workdir={workdir}"],
                                      env=srun_environment(i, 2, port), cwd=ROOT, stdout=out, stderr=err))
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [0, 0], (tmp_path / "err0").read_text()[-3000:] + (tmp_path / "err1").read_text()[-3000:]
  # One device each, two in the mesh: the processes joined one run (there was nothing else to join them).
  assert "mesh data=2 fsdp=1 tensor=1 on 2 cpu devices" in (tmp_path / "out0").read_text()
  # ...as processes 0 and 1 of 2 (SLURM_PROCID of SLURM_NTASKS): each saved its own data-loader state.
  assert sorted(os.listdir(workdir / "checkpoints" / "30" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  # Bit for bit: the same program on the same global batches; the one cross-device reduction (the data
  # axis's gradient sum) adds two numbers, a + b, which gives the same bits in either order or runtime.
  assert metrics(workdir) == metrics(one_process)
