"""SIGTERM / SIGINT become a request to stop cleanly: finish the step, save a checkpoint, exit 0.

Schedulers (Cloud TPU maintenance, SLURM, Kubernetes) send SIGTERM and wait a grace period before
SIGKILL. The loop asks `stop_requested()` after every step; with several processes they agree, so all
save at the same step. A second SIGINT (Ctrl-C twice) aborts at once.
"""

import os
import signal
import sys
import threading

from jaxlm.parallel import all_agree


class StopSignals:
  """Context manager: while inside, SIGTERM and SIGINT set a flag instead of killing the process.

  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      print(f"\njaxlm: second {name}: aborting without saving", file=sys.stderr, flush=True)
      os._exit(130)
    if self.received is None:
      print(f"\njaxlm: {name} received: finishing this step, then saving a checkpoint "
            "(press Ctrl-C again to abort)", file=sys.stderr, flush=True)
    self.received = self.received or name


def stop_requested(signals: StopSignals) -> bool:
  """Whether to stop after the current step; the same answer on every process."""
  return not all_agree(signals.received is None)
