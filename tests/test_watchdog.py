"""The step watchdog's limit, and what it prints when a phase stalls (its end-to-end test, a SIGSTOPped
process of a 2-process run, is in test_preemption.py)."""

import re
import time

from jaxlm import watchdog
from jaxlm.watchdog import FIRST_STEP_SECONDS, Watchdog


def test_the_automatic_limit_follows_the_first_and_the_median_step():
  dog = Watchdog(0, multi_process=True, eval_batches=20)
  try:
    assert dog.enabled and dog.limit == FIRST_STEP_SECONDS  # compiling: no measurement yet
    dog.beat("step 1", first_step=10.0, median_step=float("nan"))
    assert dog.limit == FIRST_STEP_SECONDS
    dog.beat("step 3", first_step=10.0, median_step=0.1)
    assert abs(dog.limit - (2 * 10.0 + (10 + 20) * 0.1 + 60.0)) < 1e-9
  finally:
    dog.stop()


def test_it_is_off_in_one_process_unless_set_and_minus_one_is_off():
  assert not Watchdog(0, multi_process=False, eval_batches=20).enabled  # (a debugger is not a hang)
  assert not Watchdog(-1, multi_process=True, eval_batches=20).enabled
  dog = Watchdog(5, multi_process=False, eval_batches=20)
  try:
    assert dog.enabled and dog.limit == FIRST_STEP_SECONDS  # the first step compiles
    dog.beat("step 1", first_step=3.0, median_step=float("nan"))
    assert dog.limit == 5
    dog.beat("the evaluation at step 2", compiling=True)  # (the first evaluation compiles too)
    assert dog.limit == FIRST_STEP_SECONDS
    dog.beat("step 3", first_step=3.0, median_step=0.1)
    assert dog.limit == 5
  finally:
    dog.stop()


def test_a_stalled_phase_prints_one_line_then_every_threads_stack_and_exits_3(monkeypatch, capfd):
  exits = []
  monkeypatch.setattr(watchdog.os, "_exit", exits.append)  # (the real one would end pytest)
  dog = Watchdog(0.5, multi_process=False, eval_batches=2)
  try:
    dog.beat("the evaluation at step 40")
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
      time.sleep(0.05)
  finally:
    dog.stop()
  assert exits[:1] == [3]
  err = capfd.readouterr().err
  first = err.splitlines()[0]
  assert re.match(r"jaxlm: error: no progress for \d+ s in the evaluation at step 40 \(train.step_timeout=0.5\): "
                  "a process of the run is stuck or stopped", first), err
  assert 'Thread 0x' in err and "jaxlm-watchdog" not in first and "test_watchdog.py" in err
