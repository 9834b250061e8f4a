"""Runs a jaxlm command as N local processes of one JAX distributed run (a stand-in for N hosts).

  python launch/local.py --processes=2 --devices=2 -- train --config=configs/default.py --workdir=runs/mp

Each process gets `--devices` CPU devices and joins through JAX's distributed runtime on 127.0.0.1.
SIGTERM and SIGINT are forwarded to every process (they agree on a step, save there and exit 0).
Process 0 prints to the terminal; process i>0 writes WORKDIR-less logs to launch-<i>.log here.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--logs", default=".", help="folder for the logs of processes 1..N-1")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- jaxlm arguments")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if args.processes < 1 or args.devices < 1 or not command:
    parser.error("need --processes >= 1, --devices >= 1 and a jaxlm command after --")
  port = free_port()
  procs = []
  for i in range(args.processes):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(args.processes), JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    out = None if i == 0 else open(os.path.join(args.logs, f"launch-{i}.log"), "w")  # noqa: SIM115
    procs.append(subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *command], env=env,
                                  stdout=out, stderr=subprocess.STDOUT if out else None))

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = [p.wait() for p in procs]
  return max(codes, key=abs)


if __name__ == "__main__":
  sys.exit(main())
