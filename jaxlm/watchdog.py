"""The step watchdog: a run that makes no progress for `train.step_timeout` seconds ends, with stacks.

A process of a multi-process run that is stopped (SIGSTOP, a debugger) or hung still heartbeats, so
JAX's coordination service never declares it dead (jax issue 38503), and the others wait for it in a
collective for ever. So every process runs this thread: the loop beats after each step, evaluation and
save; a phase that takes longer than the limit prints one line naming the step, then the Python stack
of every thread (faulthandler), and exits 3 (as a lost peer does: rerunning the same command resumes
from the last checkpoint).

The limit: `train.step_timeout` seconds when set (> 0). Automatic (0) in a multi-process run:
2x the first step (its compile) + (10 + train.eval_batches) x the median step + 60 s, generous enough
for an evaluation, a save, or a slow step; off in a single process (a researcher in a debugger is not
a hang). -1: off. The first step and the first evaluation, which compile, are given at least
FIRST_STEP_SECONDS.
"""

import faulthandler
import os
import sys
import threading
import time

EXIT = 3  # as a lost peer's (peers.LOST_EXIT)
FIRST_STEP_SECONDS = 1800.0  # what the first step (compiling the model) may take


class Watchdog:
  def __init__(self, configured: float, multi_process: bool, eval_batches: int):
    self.configured, self.eval_batches = float(configured), eval_batches
    self.enabled = self.configured > 0 or (self.configured == 0 and multi_process)
    self.limit = max(self.configured, FIRST_STEP_SECONDS)  # until the first step is done
    self.phase, self.since = "the first step (compiling)", time.monotonic()
    self._done = threading.Event()
    if self.enabled:
      threading.Thread(target=self._watch, name="jaxlm-watchdog", daemon=True).start()

  def beat(self, phase: str, first_step: float | None = None, median_step: float | None = None,
           compiling: bool = False) -> None:
    """Progress: `phase` starts now. After the first step, its time and the median step's set the limit;
    a phase that `compiling` (the first evaluation) gets at least FIRST_STEP_SECONDS."""
    self.phase, self.since = phase, time.monotonic()
    if self.configured > 0:
      self.limit = self.configured
    elif first_step is not None and median_step is not None and median_step == median_step:  # (not nan)
      self.limit = 2 * first_step + (10 + self.eval_batches) * median_step + 60.0
    if compiling:
      self.limit = max(self.limit, FIRST_STEP_SECONDS)

  def stop(self) -> None:
    self._done.set()

  def _watch(self) -> None:
    while not self._done.wait(1.0):
      stalled = time.monotonic() - self.since
      if stalled > self.limit:
        self._fire(stalled)

  def _fire(self, stalled: float) -> None:
    how = (f"train.step_timeout={self.configured:g}" if self.configured > 0
           else f"the automatic limit of {self.limit:.0f} s; set --config.train.step_timeout to change it")
    sys.stdout.flush()
    print(f"jaxlm: error: no progress for {stalled:.0f} s in {self.phase} ({how}): a process of the run is "
          "stuck or stopped; the stacks of this process's threads follow; run the same command again to "
          "resume from the last checkpoint", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT)
