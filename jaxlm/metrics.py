"""Model FLOPs, and the two places training numbers go: metrics.jsonl and a live console line."""

import json
import math
import os
import sys

from jaxlm.models.gpt import ModelConfig


def param_count(cfg: ModelConfig) -> int:
  """Parameters of the model (the embedding counted once when tied)."""
  d, f = cfg.width, cfg.mlp_width
  attn = 4 * d * d + (4 * d if cfg.use_bias else 0)
  mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f + ((f + d) if cfg.use_bias else 0)
  norms = (2 if cfg.norm == "layernorm" else 1) * d
  block = attn + mlp + 2 * norms
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  pos = cfg.max_seq_len * d if cfg.position == "learned" else 0
  return cfg.num_layers * block + embed + pos + norms


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token, forward and backward: 6 x (matmul parameters) + 12 x layers x T x width.

  The matmul parameters are the blocks' weights plus the output projection (the input embedding is a
  lookup); the second term is attention's score and value products (PaLM's accounting).
  """
  d, f = cfg.width, cfg.mlp_width
  block = 4 * d * d + (3 if cfg.mlp == "swiglu" else 2) * d * f
  matmul_params = cfg.num_layers * block + cfg.vocab_size * d
  return 6.0 * matmul_params + 12.0 * cfg.num_layers * seq_len * d


class MetricsLog:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl (only process 0 writes)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled

  def write(self, step: int, **values: float) -> None:
    """One line; a non-finite value is written as null (the file stays strict JSON)."""
    if self.enabled:
      row = {k: float(v) if math.isfinite(float(v)) else None for k, v in values.items()}
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")

  def drop_after(self, step: int) -> int:
    """Removes the lines of steps after `step` (written by a run that then died); returns how many.

    A resumed run writes those steps again, so the file reads as one uninterrupted run.
    """
    if not self.enabled or not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line.rstrip("\n") + "\n")
      except (ValueError, KeyError, TypeError):
        pass  # a line cut short by the kill
    if keep != lines:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    return len(lines) - len(keep)


class Progress:
  """A console line updated in place on a terminal, a plain line per report elsewhere (logs, CI)."""

  def __init__(self, total_steps: int, enabled: bool = True, stream=None):
    self.total, self.enabled = total_steps, enabled
    self.stream = stream or sys.stdout
    self.live = self.enabled and self.stream.isatty()

  def update(self, step: int, loss: float, lr: float, tokens_per_sec: float, sec_per_step: float) -> None:
    if not self.enabled:
      return
    eta = (self.total - step) * sec_per_step
    line = (f"step {step:>6d}/{self.total}  loss {loss:7.4f}  lr {lr:.2e}  "
            f"{tokens_per_sec:>9,.0f} tok/s  ETA {_duration(eta)}")
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
