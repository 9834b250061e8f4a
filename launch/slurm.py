"""Writes and submits an sbatch script that runs a jaxlm command on a SLURM GPU cluster.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --time=04:00:00 --partition=gpu \
      -- train --config=configs/default.py --workdir=/shared/runs/big

One SLURM task per GPU, each one JAX process: `JAXLM_DISTRIBUTED=auto` makes jaxlm call
`jax.distributed.initialize()` with no arguments, and JAX's SLURM detection
(jax/_src/clusters/slurm_cluster.py) reads the step's SLURM_* variables: the coordinator is the first
node of the step, the process is SLURM_PROCID of SLURM_NTASKS, and it uses GPU number SLURM_LOCALID of
its node. `--stop_before` seconds before the time limit SLURM sends the tasks SIGTERM: they finish the
step, save a checkpoint and exit 0. The job is requeueable (a preempted or failed node's job comes back
and, being the same command on the same workdir, resumes); SLURM does not requeue a job that reached its
time limit, so `--resubmit` makes the script do that itself. `--dry_run` prints the script and submits
nothing; otherwise it goes to LOGS/NAME.sbatch and to `sbatch`, whose answer (the job id) is printed.
User mistakes end in one line `slurm: error: ...` and exit code 2.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

import procs as procs_lib  # launch/procs.py (scripts here run as `python launch/x.py`)

TIME_FORMATS = (  # SLURM's --time formats -> (days, hours, minutes, seconds) group names
    r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)", r"(?P<d>\d+)-(?P<h>\d+)",
    r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)")
MAX_SIGNAL_SECONDS = 65535  # the largest sig_time sbatch's --signal takes


class UserError(Exception):
  """A mistake of the user's: one line `slurm: error: ...`, exit code 2."""


class Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


def parser() -> Parser:
  p = Parser(prog="slurm.py", description=__doc__.splitlines()[0], allow_abbrev=False)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs of each node, one task (process) each")
  p.add_argument("--cpus_per_task", type=int, default=8, help="CPU cores of each task, for its data "
                 "loading (0: the cluster's default, often 1)")
  p.add_argument("--time", required=True, help="time limit, as sbatch takes it: 04:00:00, 90 (minutes), 1-12:00:00")
  p.add_argument("--partition", default=None)
  p.add_argument("--job_name", default="jaxlm")
  p.add_argument("--logs", default=None, help="folder of the script and the logs (default: WORKDIR/logs, "
                 "or ./slurm-logs for a gs:// workdir)")
  p.add_argument("--stop_before", type=int, default=300, help="seconds before the time limit at which the "
                 "tasks get SIGTERM (they save a checkpoint and exit 0); SLURM may send it up to 60 s earlier")
  p.add_argument("--resubmit", action="store_true", help="requeue the job when the time limit stopped it, "
                 "until the run finishes (it resumes from the checkpoint saved at the stop)")
  p.add_argument("--port", type=int, default=None, help="JAX coordinator port (default: JAX's, from the job id)")
  p.add_argument("--setup", action="append", default=[], help="a shell line run before srun, e.g. "
                 "'source ~/jaxlm/.venv/bin/activate' (repeatable)")
  p.add_argument("--extra", action="append", default=[], help="another sbatch option, e.g. --extra=--account=proj "
                 "(repeatable)")
  p.add_argument("--sbatch", default="sbatch", help="the sbatch program")
  p.add_argument("--dry_run", action="store_true", help="print the script and the sbatch command only")
  return p


def parse(argv: list[str]) -> argparse.Namespace:
  """The flags before `--` go to argparse; what follows is the jaxlm command."""
  own, command = procs_lib.split_command(argv)
  args = parser().parse_args(own)
  args.command = command
  if not args.command:
    raise UserError("no jaxlm command: give it after --, e.g. -- train --config=configs/default.py "
                    "--workdir=runs/mine")
  for name in ("nodes", "gpus_per_node"):
    if getattr(args, name) < 1:
      raise UserError(f"--{name}={getattr(args, name)}: need at least 1")
  if args.cpus_per_task < 0:
    raise UserError(f"--cpus_per_task={args.cpus_per_task}: need 0 (the cluster's default) or more")
  if args.port is not None and not 0 < args.port < 65536:
    raise UserError(f"--port={args.port}: need a TCP port, 1 to 65535")
  if bad := [e for e in args.extra if not e.startswith("-")]:
    raise UserError(f"--extra={bad[0]}: give an sbatch option, e.g. --extra=--account=proj")
  if not re.fullmatch(r"[A-Za-z0-9._-]+", args.job_name):
    raise UserError(f"--job_name={args.job_name!r}: use letters, digits, '.', '_' and '-' only")
  check_stop_before(args.stop_before, time_seconds(args.time), args.time)
  return args


def time_seconds(text: str) -> int:
  """sbatch's --time as seconds (04:00:00 -> 14400); the signal before it must fit inside."""
  for pattern in TIME_FORMATS:
    if match := re.fullmatch(pattern, text):
      parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
      seconds = ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
      if seconds > 0:
        return seconds
  raise UserError(f"--time={text!r} is not a SLURM time limit: e.g. 04:00:00, 90 (minutes) or 1-12:00:00")


def check_stop_before(lead: int, limit: int, text: str) -> None:
  if not 0 < lead <= MAX_SIGNAL_SECONDS:
    raise UserError(f"--stop_before={lead}: need 1 to {MAX_SIGNAL_SECONDS} seconds")
  if lead >= limit:
    raise UserError(f"--stop_before={lead} s is not shorter than --time={text} ({limit} s): the run would be "
                    "stopped as it starts")


def workdir_of(command: list[str]) -> str | None:
  """The last --workdir of the jaxlm command (as `--workdir=W` or `--workdir W`)."""
  found = None
  for i, arg in enumerate(command):
    if arg.startswith("--workdir="):
      found = arg.split("=", 1)[1]
    elif arg == "--workdir" and i + 1 < len(command):
      found = command[i + 1]
  return found


def logs_folder(given: str | None, command: list[str]) -> str:
  """--logs, else WORKDIR/logs for a local workdir, else ./slurm-logs; absolute, as the job sees it."""
  workdir = workdir_of(command)
  if given:
    folder = given
  elif workdir and "://" not in workdir:
    folder = os.path.join(workdir, "logs")
  else:
    folder = "slurm-logs"
  folder = os.path.abspath(folder)
  if re.search(r"\s|%", folder):  # (#SBATCH lines are not shell words; % starts a file name pattern)
    raise UserError(f"the logs folder {folder!r} has a space or a '%': choose another with --logs")
  return folder


def sbatch_lines(args, logs: str) -> list[str]:
  """The #SBATCH header: the allocation, the stop signal, requeueing and the batch log."""
  signal = f"B:USR1@{args.stop_before}" if args.resubmit else f"TERM@{args.stop_before}"
  options = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={args.gpus_per_node}",
             f"--gpus-per-node={args.gpus_per_node}"]
  options += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
  options += [f"--time={args.time}"] + ([f"--partition={args.partition}"] if args.partition else [])
  options += [f"--signal={signal}", "--requeue", "--open-mode=append", f"--output={logs}/%x-%j.log",
              f"--chdir={os.getcwd()}", *args.extra]
  return [f"#SBATCH {option}" for option in options]


def environment_lines(args) -> list[str]:
  lines = ["# jaxlm calls jax.distributed.initialize(), which finds this SLURM step (its SLURM_* variables);",
           "# explicit JAX_* settings, e.g. from the submitting shell, would override that.",
           "export JAXLM_DISTRIBUTED=auto",
           "unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID JAX_LOCAL_DEVICE_IDS"]
  lines += [f"export JAX_COORDINATOR_PORT={args.port}"] if args.port else []
  return lines + ["export PYTHONUNBUFFERED=1  # (the task logs show each line as it is printed)"]


def srun_line(args, logs: str) -> str:
  """srun of one jaxlm per task. --gpu-bind=none: every task sees all GPUs of its node, and JAX picks
  number SLURM_LOCALID (a per-task binding would leave one GPU, number 0, to each)."""
  options = ["--kill-on-bad-exit=1", "--gpu-bind=none"]
  options += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []  # (srun does not inherit it)
  options += ["--open-mode=append", f"--output={logs}/%x-%j-%t.log"]
  return shlex.join(["srun", *options, "jaxlm", *args.command])


def resubmit_lines(args, srun: str) -> list[str]:
  """srun under a shell that requeues the job when the time limit stopped it (and only then)."""
  return [
      "# SLURM does not requeue a job that reaches its time limit, so this shell does: SLURM sends it",
      f"# USR1 {args.stop_before} s before the limit; it asks the tasks to stop (SIGTERM: they finish the step,",
      "# save a checkpoint, exit 0) and then requeues the job, which resumes there. A run that finished,",
      "# failed or was cancelled is not requeued.",
      "stop_requested=''",
      "on_time_limit() {",
      "  stop_requested=1",
      "  echo \"slurm: the time limit is near: asking the tasks to save a checkpoint and stop\"",
      "  scancel --signal=TERM \"$SLURM_JOB_ID\"  # (the tasks, not this shell)",
      "}",
      "trap on_time_limit USR1",
      f"{srun} &",
      "srun_pid=$!",
      "trap '' TERM  # (a cancelled or preempted job: this shell waits while the tasks save)",
      "while kill -0 \"$srun_pid\" 2>/dev/null; do wait \"$srun_pid\"; done  # (a trap ends a wait early)",
      "wait \"$srun_pid\"; code=$?",
      "if [ \"$code\" = 0 ] && [ -n \"$stop_requested\" ]; then",
      "  echo \"slurm: stopped for the time limit; requeueing job $SLURM_JOB_ID to resume from the checkpoint\"",
      "  scontrol requeue \"$SLURM_JOB_ID\"",
      "fi",
      "exit \"$code\"",
  ]


def script(args, logs: str) -> str:
  """The whole sbatch script."""
  srun = srun_line(args, logs)
  check = ("command -v jaxlm >/dev/null || { echo \"slurm: error: jaxlm is not on PATH on $(hostname) (install "
           "it there, or activate its environment with --setup)\" >&2; exit 2; }")
  body = resubmit_lines(args, srun) if args.resubmit else [srun]
  return "\n".join(["#!/bin/bash", f"# Written by launch/slurm.py: {shlex.join(['jaxlm', *args.command])}",
                    *sbatch_lines(args, logs), "", *environment_lines(args), *args.setup, check, "",
                    *body]) + "\n"


def submit(args, logs: str, text: str) -> int:
  """Writes the script to LOGS/NAME.sbatch and gives it to sbatch; returns sbatch's exit code."""
  program = shutil.which(args.sbatch)
  if program is None:
    raise UserError(f"{args.sbatch} is not on PATH (run this on the cluster's login node, or --dry_run to see "
                    "the script)")
  os.makedirs(logs, exist_ok=True)
  path = os.path.join(logs, f"{args.job_name}.sbatch")
  with open(path, "w") as f:
    f.write(text)
  done = subprocess.run([program, path], stdout=subprocess.PIPE, text=True)
  print(done.stdout, end="")
  if done.returncode == 0 and (job := re.search(r"(\d+)\s*$", done.stdout)):
    print(f"logs: {logs}/{args.job_name}-{job.group(1)}.log (the job), "
          f"{logs}/{args.job_name}-{job.group(1)}-<task>.log (task 0 prints the training)")
  return done.returncode


def main(argv: list[str] | None = None) -> int:
  try:
    args = parse(sys.argv[1:] if argv is None else argv)
    logs = logs_folder(args.logs, args.command)
    text = script(args, logs)
    if args.dry_run:
      print(text, end="")
      print(f"\n(dry run: would write {logs}/{args.job_name}.sbatch and run: "
            f"{shlex.join([args.sbatch, f'{logs}/{args.job_name}.sbatch'])})")
      return 0
    return submit(args, logs, text)
  except UserError as e:
    print(f"slurm: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
