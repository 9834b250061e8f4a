"""Packing of encoder-decoder examples (t5x/seqio style): both sides of several examples share one row.

An example is one document of a pairs store (prepare.py): its weight-0 tokens (the prompt) are the
encoder's input, with one EOS appended because T5's inputs end with EOS; its weight-1 tokens (the
response, which already ends with EOS) are the decoder's target. A row has `seq_len` encoder positions
and `target_len` decoder positions. An input or target that is too long keeps its first tokens.

The packing plan is fixed for the run: the examples, in the order of one permutation drawn from the
seed, are packed greedily (an example joins the current row while both of its sides still fit, else it
starts a new one). Each epoch then visits the plan's rows in a new order drawn from (seed, epoch). t5x
re-packs every epoch instead; a fixed plan gives every epoch the same number of rows, so row n is
(epoch, row of the plan) = divmod(n, rows_per_epoch) and a row is a pure function of (seed, row
number), like Packer's rows: any process can cut any row, and a resumed run cuts the same ones. Which
examples share a row does not change between epochs, but as attention never crosses segments, that only
decides which examples share a batch row, not what any of them sees.

Each example in a row is one segment on both sides: `input_segment_ids` and `target_segment_ids` number
them 1, 2, ... (the same number on both sides, so cross-attention can stay within an example), and
positions count from 0 in each. Padding is segment 0, position 0, token `pad`.
"""

import numpy as np

from jaxlm.data.packing import EPOCH_LIMIT

# The plan's permutation is drawn from [seed, stream, "pair"], the epochs' from [seed, stream, epoch]: the
# two meet only at epoch 0x70616972 (~1.9e9), which no run reaches.
_PLAN_STREAM = 0x70616972


def example_lengths(offsets: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per document of a pairs split: (input length with its appended EOS, target length), both int64.

  Vectorised (one reduceat over the 0/1 weights a store holds), as it runs on a whole training split at
  start-up."""
  offsets = np.asarray(offsets, np.int64)
  lengths = np.diff(offsets)
  targets = np.zeros(len(lengths), np.int64)
  full = np.flatnonzero(lengths > 0)  # reduceat gives an empty segment its next token, not 0: skip them
  if len(full):
    # Each full document's sum runs to the next full document's start: empty ones in between add nothing.
    targets[full] = np.add.reduceat(weights[:offsets[-1]], offsets[full], dtype=np.int64)
  return lengths - targets + 1, targets


def split_example(tokens: np.ndarray, weights: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
  """One document's (input ids + EOS, target ids), int32: its weight-0 tokens and its weight-1 tokens."""
  tokens, response = np.asarray(tokens, np.int32), np.asarray(weights) != 0
  return np.append(tokens[~response], np.int32(eos)), tokens[response]


def _greedy_starts(input_lengths: np.ndarray, target_lengths: np.ndarray, seq_len: int,
                   target_len: int) -> np.ndarray:
  """Where each row of a greedy packing of the examples (in this order) starts, and the end: rows + 1.

  For every example at once, the first one that no longer fits a row starting there (two searchsorted
  over the running sums), then a walk along that chain from 0: a loop over rows, not examples."""
  ends_in = np.concatenate([[0], np.cumsum(input_lengths)])
  ends_tg = np.concatenate([[0], np.cumsum(target_lengths)])
  fit_in = np.searchsorted(ends_in, ends_in[:-1] + seq_len, side="right") - 1
  fit_tg = np.searchsorted(ends_tg, ends_tg[:-1] + target_len, side="right") - 1
  following = np.minimum(fit_in, fit_tg).tolist()  # > i, as every (truncated) example fits a row alone
  starts, i, n = [], 0, len(input_lengths)
  while i < n:
    starts.append(i)
    i = following[i]
  starts.append(n)
  return np.asarray(starts, np.int64)


class PairPacker:
  """Cuts packed encoder-decoder rows from the examples of one pairs split, given their offsets
  (documents + 1 entries) and their lengths from `example_lengths`."""

  def __init__(self, offsets: np.ndarray, input_lengths: np.ndarray, target_lengths: np.ndarray, seq_len: int,
               target_len: int, seed: int, pad: int, stream: int = 0, shuffle: bool = True):
    self.offsets = np.asarray(offsets, np.int64)
    input_lengths, target_lengths = np.asarray(input_lengths, np.int64), np.asarray(target_lengths, np.int64)
    documents = len(self.offsets) - 1
    if not len(input_lengths) == len(target_lengths) == documents or seq_len < 1 or target_len < 1:
      raise ValueError(f"{documents} documents, {len(input_lengths)} input and "
                       f"{len(target_lengths)} target lengths, seq_len={seq_len}, target_len={target_len}")
    if not len(input_lengths):
      raise ValueError("a split without examples has no rows")
    self.seq_len, self.target_len, self.seed, self.pad = seq_len, target_len, seed, pad
    self.stream, self.shuffle = stream, shuffle
    self.truncated_inputs = int(np.count_nonzero(input_lengths > seq_len))
    self.truncated_targets = int(np.count_nonzero(target_lengths > target_len))
    inputs, targets = np.minimum(input_lengths, seq_len), np.minimum(target_lengths, target_len)
    n = len(inputs)
    self.order = self._permutation(_PLAN_STREAM, n)  # the plan: examples in packing order ...
    self.row_starts = _greedy_starts(inputs[self.order], targets[self.order], seq_len, target_len)
    self.rows_per_epoch = len(self.row_starts) - 1  # ... plan row p = order[row_starts[p]:row_starts[p + 1]]
    # The share of positions that hold tokens, not padding (for a start-up line).
    self.input_fill = float(inputs.sum()) / (self.rows_per_epoch * seq_len)
    self.target_fill = float(targets.sum()) / (self.rows_per_epoch * target_len)
    self._epoch, self._rows = None, None

  def __getstate__(self):  # worker processes redraw the epoch's order; the plan travels (no re-packing)
    return {**self.__dict__, "_epoch": None, "_rows": None}

  def _permutation(self, key: int, n: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(n, dtype=np.int64)
    return np.random.default_rng([self.seed, self.stream, key]).permutation(n)

  def pieces(self, row: int) -> list[int]:
    """The examples (document numbers) of row `row`, counted over all epochs, in the row's order."""
    epoch, r = divmod(int(row), self.rows_per_epoch)
    if not 0 <= epoch < EPOCH_LIMIT:
      raise IndexError(f"row {row} is outside the {EPOCH_LIMIT} epochs of {self.rows_per_epoch} rows")
    if epoch != self._epoch:
      self._rows, self._epoch = self._permutation(epoch, self.rows_per_epoch), epoch
    p = int(self._rows[r])
    return self.order[self.row_starts[p]:self.row_starts[p + 1]].tolist()

  def spans(self, pieces: list[int]) -> list[tuple[int, int]]:
    """The token ranges of the split to read for `pieces`: each example's whole document."""
    return [(int(self.offsets[d]), int(self.offsets[d + 1])) for d in pieces]

  def row(self, pieces: list[int], tokens: list[np.ndarray],
          weights: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One row from `pieces` and the tokens and weights read for their `spans`.

    The EOS appended to an input is the document's last token: a store ends every document with EOS, so
    the packer needs no EOS argument of its own."""
    examples = [split_example(t, w, np.asarray(t)[-1]) for t, w in zip(tokens, weights)]
    inputs = self._side([i[:self.seq_len] for i, _ in examples], self.seq_len)
    targets = self._side([t[:self.target_len] for _, t in examples], self.target_len)
    return {"inputs": inputs[0], "input_segment_ids": inputs[1], "input_positions": inputs[2],
            "targets": targets[0], "target_segment_ids": targets[1], "target_positions": targets[2]}

  def _side(self, parts: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment ids, positions) of one side of a row: `parts` end to end, then padding."""
    used = sum(len(p) for p in parts)
    if used > length:
      raise ValueError(f"{used} tokens do not fit in {length} positions: pieces from another plan?")
    pad = length - used
    ids = np.concatenate([np.asarray(p, np.int32) for p in parts] + [np.full(pad, self.pad, np.int32)])
    segments = np.concatenate([np.full(len(p), s, np.int32) for s, p in enumerate(parts, start=1)]
                              + [np.zeros(pad, np.int32)])
    positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in parts] + [np.zeros(pad, np.int32)])
    return ids, segments, positions

  def rows_from_array(self, rows, tokens: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Packed rows stacked into a batch, reading from a split held in memory."""
    out = []
    for r in rows:
      pieces = self.pieces(r)
      spans = self.spans(pieces)
      out.append(self.row(pieces, [tokens[a:b] for a, b in spans], [weights[a:b] for a, b in spans]))
    return {k: np.stack([o[k] for o in out]) for k in out[0]}
