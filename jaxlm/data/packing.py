"""Document packing: rows of seq_len positions cut from a shuffled stream of whole documents.

Each epoch shuffles the documents of a split (by seed and epoch) and lays them end to end; row r of
the epoch is positions [r*T, (r+1)*T) of that stream, so nothing is padded and every token is a
target once per epoch. A document longer than what is left of a row continues in the next row.

A row is a window of T + 1 tokens of that stream, like the windows of a plain token stream: its first
token is the one before the row (the previous document's EOS, which serves as the next one's
beginning-of-text token; EOS too at the start of an epoch), then T tokens of documents. Each piece of a
document among those T is one segment: `segment_ids` number them 1, 2, ... and `positions` count from 0
in each, and the model lets a position attend only inside its own segment. A causal LM's input before a
document's first token is thus EOS, so a packed document is trained on exactly as if it were alone in its
row. Loss `weights` (a pairs store) come with the T tokens they belong to.

Rows are a pure function of (offsets, seq_len, seed, row number): any process can cut any row, and a
resumed run cuts the same ones.
"""

import numpy as np

EPOCH_LIMIT = 1 << 40  # rows are numbered through this many epochs (an endless stream, in practice)


class Packer:
  """Cuts packed rows from the documents of one split, given their offsets (documents + 1 entries)."""

  def __init__(self, offsets: np.ndarray, seq_len: int, seed: int, eos: int, stream: int = 0):
    self.offsets = np.asarray(offsets, np.int64)
    self.lengths = np.diff(self.offsets)
    self.seq_len, self.seed, self.eos, self.stream = seq_len, seed, eos, stream
    self.rows_per_epoch = int(self.lengths.sum()) // seq_len
    self._epoch, self._order, self._ends = None, None, None

  def __getstate__(self):  # worker processes recompute the epoch's order
    return {**self.__dict__, "_epoch": None, "_order": None, "_ends": None}

  def _shuffle(self, epoch: int) -> None:
    if epoch != self._epoch:
      self._order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(len(self.lengths))
      self._ends = np.cumsum(self.lengths[self._order])
      self._epoch = epoch

  def pieces(self, row: int) -> list[tuple[int, int, int]]:
    """Row `row` (counted over all epochs) as (document, first token, end token) pieces, in order."""
    epoch, r = divmod(int(row), self.rows_per_epoch)
    self._shuffle(epoch)
    begin, end = r * self.seq_len, (r + 1) * self.seq_len
    first = int(np.searchsorted(self._ends, begin, side="right"))
    out = []
    for i in range(first, len(self._order)):
      doc_end = int(self._ends[i])
      doc_begin = doc_end - int(self.lengths[self._order[i]])
      out.append((int(self._order[i]), max(begin, doc_begin) - doc_begin, min(end, doc_end) - doc_begin))
      if doc_end >= end:
        break
    return out

  def spans(self, pieces: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The token ranges of the split to read for `pieces`: each piece's tokens, and the one before it."""
    return [(int(self.offsets[d]) + max(a - 1, 0), int(self.offsets[d]) + b) for d, a, b in pieces]

  def row(self, pieces: list[tuple[int, int, int]], tokens: list[np.ndarray],
          weights: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One row from `pieces` and the tokens (and weights) read for their `spans`."""
    (_, a0, _), first = pieces[0], np.asarray(tokens[0], np.int32)
    parts = [first[:1] if a0 > 0 else np.array([self.eos], np.int32)]  # the token before the row
    kept, segments, positions = [], [], []
    for number, ((_, a, b), read) in enumerate(zip(pieces, tokens), start=1):
      kept.append(slice(1, None) if a > 0 else slice(None))  # (without the token read before a piece)
      parts.append(np.asarray(read, np.int32)[kept[-1]])
      segments.append(np.full(b - a, number, np.int32))
      positions.append(np.arange(b - a, dtype=np.int32))
    row = {"tokens": np.concatenate(parts), "segment_ids": np.concatenate(segments),
           "positions": np.concatenate(positions)}
    if weights is not None:
      row["weights"] = np.concatenate([np.asarray(w, np.float32)[k] for w, k in zip(weights, kept)])
    return row

  def rows_from_array(self, rows, tokens: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Packed rows stacked into a batch, reading from a split held in memory."""
    out = []
    for r in rows:
      pieces = self.pieces(r)
      spans = self.spans(pieces)
      out.append(self.row(pieces, [tokens[a:b] for a, b in spans],
                          None if weights is None else [weights[a:b] for a, b in spans]))
    return {k: np.stack([o[k] for o in out]) for k in out[0]}
