"""Document packing: rows of seq_len positions cut from a shuffled stream of whole documents.

Each epoch shuffles the documents of a split (by seed and epoch) and lays them end to end; row r of
the epoch is positions [r*T, (r+1)*T) of that stream, so nothing is padded and every token is a
target once per epoch. A document longer than what is left of a row continues in the next row.

In a row, each piece of a document is one segment: `segment_ids` number them 1, 2, ... and
`positions` count from 0 in each, and the model lets a position attend only inside its own segment.
Targets are the document's tokens (which end with EOS); the input before a document's first token is
EOS, which serves as its beginning-of-text token. So a packed document is trained on exactly as if it
were alone in its row.

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

  def row(self, pieces: list[tuple[int, int, int]], tokens: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One training row from `pieces` and the tokens read for their `spans`."""
    inputs, targets, segments, positions = [], [], [], []
    for number, ((_, a, b), read) in enumerate(zip(pieces, tokens), start=1):
      read = np.asarray(read, np.int32)
      inputs.append(read[:-1] if a > 0 else np.concatenate([[self.eos], read[:-1]]).astype(np.int32))
      targets.append(read[1:] if a > 0 else read)
      segments.append(np.full(b - a, number, np.int32))
      positions.append(np.arange(b - a, dtype=np.int32))
    return {"inputs": np.concatenate(inputs), "targets": np.concatenate(targets),
            "segment_ids": np.concatenate(segments), "positions": np.concatenate(positions)}

  def rows_from_array(self, rows, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Packed rows stacked into a batch, reading from a split held in memory."""
    out = []
    for r in rows:
      pieces = self.pieces(r)
      out.append(self.row(pieces, [tokens[a:b] for a, b in self.spans(pieces)]))
    return {k: np.stack([o[k] for o in out]) for k in out[0]}
