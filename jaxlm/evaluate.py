"""Evaluation: an objective's sums added over batches by one compiled eval step, and the rows of a whole
token stream.

The loop's periodic evaluation (a fixed sample of validation batches) and `jaxlm eval` / `Run.evaluate`
(every token of a split or file) both go through an `Evaluator`, which keeps its compiled eval step:
evaluating again does not compile again.

A stream is cut into consecutive rows of seq_len + 1 tokens that overlap by one (the last token of a row
is the first, context, token of the next), so every token after the first is in exactly one row's last
seq_len: a causal LM predicts each once, a masked LM may select each once. The last row and the last
batch are padded with weight-0 positions in segment 0, which no real position attends to.
"""

from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from jaxlm.data.text import first_row
from jaxlm.objectives.base import EVAL_STREAM, summarize
from jaxlm.parallel import to_global_batch


class Evaluator:
  """Adds the sums of `eval_step(params, batch)` over batches of rows made into the objective's batches
  by `transform`, one batch in flight at a time (as in training)."""

  def __init__(self, eval_step: Callable, transform: Callable, sharding, first_row: int = 0):
    self.eval_step, self.transform, self.sharding, self.first_row = eval_step, transform, sharding, first_row

  def totals(self, params, rows: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    total = {}
    for i, r in enumerate(rows):
      batch = to_global_batch(self.transform(r, i, self.first_row), self.sharding)
      for k, v in jax.device_get(self.eval_step(params, batch)).items():
        total[k] = total.get(k, 0.0) + float(v)
    return total

  def evaluate(self, params, rows: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """loss, perplexity, bits_per_byte, accuracy (where the objective counts it) and counted tokens."""
    return summarize(self.totals(params, rows))


def stream_rows(tokens: np.ndarray, seq_len: int, batch_size: int, process_index: int = 0,
                process_count: int = 1, weights: np.ndarray | None = None,
                offsets: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of batches covering the stream: tokens (B, T + 1), weights and segment ids (B, T).

  `weights` (one per token of the stream, e.g. a pairs store's) mark which tokens count; by default all.
  `offsets` (where each document starts, and the end): rows as a run on packed documents saw them, each
  piece of a document in a row its own segment, with positions from 0 (packing.py).
  """
  windows = max(1, -(-(len(tokens) - 1) // seq_len))
  rows = batch_size // process_count
  for first in range(0, windows, batch_size):
    batch = {"tokens": np.zeros((batch_size, seq_len + 1), np.int32),
             "weights": np.zeros((batch_size, seq_len), np.float32),
             "segment_ids": np.zeros((batch_size, seq_len), np.int32)}
    if offsets is not None:
      batch["positions"] = np.zeros((batch_size, seq_len), np.int32)
    for row, w in enumerate(range(first, min(first + batch_size, windows))):  # (w: the window)
      at = slice(w * seq_len, w * seq_len + seq_len + 1)
      piece = np.asarray(tokens[at], np.int32)
      n = len(piece) - 1
      batch["tokens"][row, :n + 1] = piece
      batch["weights"][row, :n] = 1.0 if weights is None else np.asarray(weights[at][1:], np.float32)
      batch["segment_ids"][row, :n] = 1
      if offsets is not None:
        targets = np.arange(w * seq_len + 1, w * seq_len + 1 + n)  # stream indices of the row's tokens
        docs = np.searchsorted(offsets, targets, side="right") - 1
        batch["segment_ids"][row, :n] = docs - docs[0] + 1
        batch["positions"][row, :n] = targets - np.maximum(np.asarray(offsets)[docs], targets[0])
    yield {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def example_rows(packer, tokens: np.ndarray, weights: np.ndarray, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of batches holding every example of a split once (a packer of whole examples,
  unshuffled: data/pairs.py); the last batch is padded with empty rows (segment 0, nothing counts)."""
  rows = batch_size // process_count
  for first in range(0, packer.rows_per_epoch, batch_size):
    batch = packer.rows_from_array(range(first, min(first + batch_size, packer.rows_per_epoch)), tokens, weights)
    batch = {k: np.concatenate([v, np.zeros((batch_size - len(v),) + v.shape[1:], v.dtype)])
             for k, v in batch.items()}
    yield {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def stream_evaluator(eval_step, objective, tokenizer, seed: int, sharding, batch_size: int,
                     data=None) -> Evaluator:
  """The Evaluator of `jaxlm eval`: the objective's batches of the EVAL stream (fixed masks per seed)."""
  first = first_row(batch_size, jax.process_index(), jax.process_count())
  return Evaluator(eval_step, objective.transform(tokenizer, seed, EVAL_STREAM, data), sharding, first)
