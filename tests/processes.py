"""Fresh `jaxlm` processes for tests: one, or several joined into a local JAX distributed run."""

import os
import socket
import subprocess
import sys

from conftest import ROOT


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def spawn_jaxlm(args: list[str], *, devices: int, processes: int = 1, outputs=None) -> list[subprocess.Popen]:
  """`python -m jaxlm.cli ARGS` as `processes` processes of `devices` CPU devices each.

  `outputs(i)` gives process i's (stdout, stderr); by default both are pipes.
  """
  port = free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # (importing jax set it here; a user's shell has none)
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i))
    out, err = outputs(i) if outputs else (subprocess.PIPE, subprocess.PIPE)
    procs.append(subprocess.Popen([sys.executable, "-m", "jaxlm.cli", *args], env=env, cwd=ROOT,
                                  stdout=out, stderr=err, text=True))
  return procs
