"""Runs a jaxlm command as N local processes of one JAX distributed run (a stand-in for N hosts).

  python launch/local.py --processes=2 --devices=2 -- train --config=configs/default.py --workdir=runs/mp

Each process gets `--devices` CPU devices and joins through JAX's distributed runtime on 127.0.0.1.
Process 0 prints to the terminal; process i > 0 writes to LOGS/launch-<i>.log, LOGS being `--logs`, else
WORKDIR/logs for a command with a local --workdir, else a new temporary folder (the launcher names it).
SIGTERM and SIGINT are forwarded to every process (they agree on a step, save there and exit 0).
When a process fails (a non-zero exit, or killed), the launcher names it, ends the others at once
(SIGTERM, then SIGKILL after a few seconds) and exits non-zero; rerunning the command resumes.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

import procs as procs_lib  # launch/procs.py (scripts here run as `python launch/x.py`)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def logs_folder(given: str | None, command: list[str]) -> str:
  """Where the logs of processes 1..N-1 go: --logs, else WORKDIR/logs, else a new temporary folder."""
  if given:
    folder = given
  else:
    workdirs = [a.split("=", 1)[1] for a in command if a.startswith("--workdir=")]
    local = workdirs and "://" not in workdirs[-1]  # (a gs:// workdir: the logs stay on this machine)
    folder = os.path.join(workdirs[-1], "logs") if local else tempfile.mkdtemp(prefix="jaxlm-launch-")
  os.makedirs(folder, exist_ok=True)
  return folder


def start(command: list[str], processes: int, devices: int, logs: str) -> list[subprocess.Popen]:
  port = free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = None if i == 0 else open(os.path.join(logs, f"launch-{i}.log"), "w")  # noqa: SIM115
    # Each in its own process group: a terminal's Ctrl-C reaches the launcher alone, which forwards it
    # once (twice would abort the run without saving).
    procs.append(subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *command], env=env, process_group=0,
                                  stdout=out, stderr=subprocess.STDOUT if out else None))
  return procs


def failure_line(logs: str, count: int) -> Callable[[int, int], str]:
  """The line that names a failed process (and the log of one that is not process 0)."""
  def line(i: int, code: int) -> str:
    where = "" if i == 0 else f" (its log: {os.path.join(logs, f'launch-{i}.log')})"
    return f"launch: process {i} of {count} {procs_lib.how(code)}{where}; ending the others"
  return line


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--logs", default=None, help="folder for the logs of processes 1..N-1 "
                      "(default: WORKDIR/logs)")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- jaxlm arguments")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if args.processes < 1 or args.devices < 1 or not command:
    parser.error("need --processes >= 1, --devices >= 1 and a jaxlm command after --")
  logs = logs_folder(args.logs, command)
  procs = start(command, args.processes, args.devices, logs)

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  return procs_lib.supervise(procs, failure_line(logs, len(procs)), procs_lib.end)


if __name__ == "__main__":
  sys.exit(main())
