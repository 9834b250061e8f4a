"""Model FLOPs, and the places training numbers go: metrics.jsonl, TensorBoard and a live console line."""

import json
import math
import sys

import jax

from jaxlm import files, storage_errors
from jaxlm.event_files import EventFile, drop_events_after


def param_count(params) -> int:
  """Parameters of a model's (abstract) state: every array's size, a tied embedding once."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def flops_per_token(eval_step, params, batch: dict) -> float:
  """Model FLOPs per trained token, forward and backward, of the model as it is compiled: XLA's count of
  one forward pass (the eval step, lowered again: traced, not compiled) times 3, as the backward pass
  costs two forwards. Embedding lookups count nothing, the output projection and attention's score and
  value products count in full (causal masking computes them all), as in PaLM's accounting. A scanned
  stack (model.scan_layers) is counted wrong: XLA counts a loop's body once, not once per layer."""
  cost = eval_step.lower(params, batch).cost_analysis()
  return 3.0 * float(cost["flops"]) / batch["inputs"].size


def si(value: float) -> str:
  """1.23e9 -> '1.23 G', 150 -> '150 ' (followed by a unit)."""
  for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {prefix}"
  return f"{value:.3g} "


# The keys of metrics.jsonl that measure wall-clock speed: two runs of the same config differ only in these.
SPEED_KEYS = ("tokens_per_sec", "tokens_per_sec_per_device", "mfu")


def parse_rows(text: str) -> list[dict]:
  """metrics.jsonl's lines as dicts (a line cut short by a kill is skipped)."""
  rows = []
  for line in text.splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      pass
  return rows


class MetricsLog:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl, and the same values as TensorBoard scalars
  to WORKDIR/tensorboard/ (only process 0 writes; the one place a row goes out to both).

  In a bucket, where objects cannot be appended to, the file is kept in memory and each line rewrites
  it (one upload per logged step)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = files.join(workdir, "metrics.jsonl")
    self.tensorboard = files.join(workdir, "tensorboard")
    self.enabled = enabled
    self._text: str | None = None  # (a bucket's copy)
    self._events: EventFile | None = None  # (opened by the first write: a finished run's rerun adds no file)
    self._start: int | None = 0  # (the step this log writes from, until its event file is told)

  def write(self, step: int, **values: float) -> None:
    """One line; a non-finite value is written as null (the file stays strict JSON)."""
    if self.enabled:
      values = {k: float(v) for k, v in values.items()}
      row = {k: v if math.isfinite(v) else None for k, v in values.items()}
      line = json.dumps({"step": step, **row}, allow_nan=False) + "\n"
      with storage_errors.writing("metrics.jsonl and TensorBoard's events", files.split(self.path)[0]):
        self._write(line, step, values)

  def _write(self, line: str, step: int, values: dict[str, float]) -> None:
    if files.is_remote(self.path):
      self._text = (self._read() if self._text is None else self._text) + line
      files.write_text(self.path, self._text)
    else:
      with open(self.path, "a") as f:
        f.write(line)
    # TensorBoard gets non-finite values as they are (NaN, +-inf), not skipped: its chart marks them at
    # the step they happened (where a run diverged) and its smoothing passes over them; skipped, the
    # curve would just end a step early.
    self._event_file().write(step, values)

  def open(self) -> None:
    """Opens the event file now, not at the first write: tensorboardX takes about a second to import
    where torch is installed (it imports torch), which the loop keeps out of its timed steps."""
    if self.enabled:
      self._event_file()

  def _event_file(self) -> EventFile:
    if self._events is None:
      self._events = EventFile(self.tensorboard)
    if self._start is not None:
      self._events.start(self._start)
      self._start = None
    return self._events

  def close(self) -> None:
    """Closes the TensorBoard file (metrics.jsonl is closed after every line)."""
    if self._events is not None:
      self._events.close()
      self._events = None

  def rows(self) -> list[dict]:
    """What the file holds, one dict per line."""
    return parse_rows(self._text if self._text is not None else self._read())

  def _read(self) -> str:
    try:
      return files.read_text(self.path)
    except FileNotFoundError:
      return ""

  def drop_after(self, step: int) -> int:
    """Removes the lines of steps after `step` (written by a run that then died); returns how many.
    The event files lose those steps too, and the next event file starts at step + 1, so that a
    TensorBoard already watching drops them as well.

    A resumed run writes those steps again, so the file reads as one uninterrupted run.
    """
    if not self.enabled:
      return 0
    self.close()  # (the steps after `step` may be in the file this log writes: the next write opens another)
    drop_events_after(self.tensorboard, step)
    self._start = step + 1
    if not files.exists(self.path):
      return 0
    lines = self._read().splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line.rstrip("\n") + "\n")
      except (ValueError, KeyError, TypeError):
        pass  # a line cut short by the kill
    if keep != lines:
      files.write_text(self.path, "".join(keep))
    self._text = None
    return len(lines) - len(keep)


class Progress:
  """A console line updated in place on a terminal, a plain line per report elsewhere (logs, CI)."""

  def __init__(self, total_steps: int, enabled: bool = True, stream=None):
    self.total, self.enabled = total_steps, enabled
    self.stream = stream or sys.stdout
    self.live = self.enabled and self.stream.isatty()

  def update(self, step: int, loss: float, lr: float, tokens_per_sec: float, sec_per_step: float,
             accuracy: float | None = None, mfu: float | None = None) -> None:
    if not self.enabled:
      return
    eta = (self.total - step) * sec_per_step
    shown = f"  accuracy {accuracy:.3f}" if accuracy is not None else ""
    utilisation = f"  MFU {mfu:5.1%}" if mfu is not None else ""
    line = (f"step {step:>6d}/{self.total}  loss {loss:7.4f}{shown}  lr {lr:.2e}  "
            f"{tokens_per_sec:>9,.0f} tok/s{utilisation}  ETA {_duration(eta)}")
    self.stream.write(("\r" + line + "\x1b[K") if self.live else line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(("\r\x1b[K" if self.live else "") + text + "\n")
      self.stream.flush()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
