"""Supervision of a launcher's child processes, shared by launch/local.py and launch/tpu.py.

A launcher starts one child per process of a run (a local jaxlm, or an ssh session to a TPU worker),
then `supervise`s them: the first child that fails (a non-zero exit, or killed) is named in one line
and the others are ended at once, since a multi-process run cannot go on without one of its processes.
"""

import signal
import subprocess
import sys
import time
from collections.abc import Callable

GRACE_SECONDS = 5  # between the SIGTERM and the SIGKILL that end the survivors of a failed process


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
  """A launcher's own flags (before `--`) and the jaxlm command (after it)."""
  split = argv.index("--") if "--" in argv else len(argv)
  return argv[:split], argv[split + 1:]


def how(code: int) -> str:
  """A child's exit as words: 'exited with code 3', 'was killed by SIGKILL'."""
  return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def exit_code(code: int) -> int:
  """The launcher's exit code for a child's returncode (a signal N becomes 128 + N, as in a shell)."""
  return code if code >= 0 else 128 - code


def supervise(procs: list[subprocess.Popen], failure: Callable[[int, int], str],
              end: Callable[[list[subprocess.Popen]], None]) -> int:
  """Waits for every process; the first that fails ends the others. Returns the launcher's exit code.

  `failure(i, code)` is the line printed when process i fails with returncode `code`; `end(procs)`
  then ends the others (it may find some already gone).
  """
  while True:
    codes = [p.poll() for p in procs]
    failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      i, code = failed[0]
      print(failure(i, code), file=sys.stderr, flush=True)
      end(procs)
      return exit_code(code)
    if all(code == 0 for code in codes):
      return 0
    time.sleep(0.05)


def wait_all(procs: list[subprocess.Popen], seconds: float) -> bool:
  """Waits up to `seconds` in all for every process to end; whether they all did."""
  deadline = time.monotonic() + seconds
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
      return False
  return True


def kill(procs: list[subprocess.Popen]) -> None:
  """SIGKILL to every process still running, then reaps them."""
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def end(procs: list[subprocess.Popen]) -> None:
  """Ends local processes: SIGTERM, then SIGKILL to those still there after GRACE_SECONDS."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  if not wait_all(procs, GRACE_SECONDS):
    kill(procs)
