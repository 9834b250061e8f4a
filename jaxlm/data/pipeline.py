"""The grain pipeline that feeds training from a token store (store.py).

Rows are cut from the training split in one of two ways (`data.sequences`):
- `windows`: windows of seq_len + 1 tokens (documents inside are separated by the EOS each one ends
  with); window numbers are shuffled by the seed, differently every epoch;
- `packed`: whole documents, shuffled every epoch and packed end to end, with segment ids and
  positions that keep each document to itself (packing.py).
A pairs store adds each row's loss weights. Row numbers are grouped into global batches; each process
keeps its own contiguous rows of every global batch and reads only those from the store, in one batched
tensorstore read, and turns them into the objective's batch (`transform(rows, step, first_row)`).
Reading and transforming run ahead of training in background threads (and optionally worker
processes). The iterator's state is checkpointed with the train state and restores exactly: the same
next batches, with or without workers.

Because every process cuts the same global batches and keeps rows [p*L, (p+1)*L), the global batch
assembled with `jax.make_array_from_process_local_data` is the same on any number of processes.
"""

import json

import absl.flags
import grain
import numpy as np

from jaxlm.data import store
from jaxlm.data.packing import EPOCH_LIMIT, Packer


class _Split:
  """A split's tokens (and loss weights, for a pairs store) in the store, read in batched ranges.
  Picklable: workers reopen the store lazily."""

  def __init__(self, path: str, split: str, weights: bool = False):
    self.path, self.split, self.weights = path, split, weights
    self._arrays = None

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}

  def read(self, spans: list[tuple[int, int]]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """(tokens, weights or None) of each span."""
    if self._arrays is None:
      opened = store.TokenStore(self.path)
      self._arrays = [opened.tokens(self.split)] + ([opened.weights(self.split)] if self.weights else [])
    futures = [[array[a:b].read() for a, b in spans] for array in self._arrays]
    tokens, *weights = [[f.result() for f in fs] for fs in futures]
    return tokens, (weights[0] if weights else None)


class _Windows:
  """Row n: the window of seq_len + 1 tokens at n * seq_len."""

  def __init__(self, split: _Split, seq_len: int):
    self.split, self.seq_len = split, seq_len

  def batch(self, numbers: np.ndarray) -> dict[str, np.ndarray]:
    t = self.seq_len
    tokens, weights = self.split.read([(int(n) * t, int(n) * t + t + 1) for n in numbers])
    rows = {"tokens": np.stack(tokens).astype(np.int32)}
    if weights is not None:
      rows["weights"] = np.stack(weights)[:, 1:].astype(np.float32)  # (of the last seq_len tokens)
    return rows


class _Packed:
  """Row n: packed row n of the shuffled documents (packing.py)."""

  def __init__(self, split: _Split, packer: Packer):
    self.split, self.packer = split, packer

  def batch(self, numbers: np.ndarray) -> dict[str, np.ndarray]:
    pieces = [self.packer.pieces(n) for n in numbers]
    spans = [span for p in pieces for span in self.packer.spans(p)]
    (tokens, weights), rows, at = self.split.read(spans), [], 0
    for p in pieces:
      rows.append(self.packer.row(p, tokens[at:at + len(p)], None if weights is None else weights[at:at + len(p)]))
      at += len(p)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _LocalBatch:
  """(step, global batch of row numbers) -> this process's rows, as the objective's batch."""

  def __init__(self, rows, process_index: int, process_count: int, transform):
    self.rows, self.process_index, self.process_count = rows, process_index, process_count
    self.transform = transform

  def __call__(self, step: int, numbers: np.ndarray) -> dict[str, np.ndarray]:
    count = len(numbers) // self.process_count
    rows = self.rows.batch(numbers[self.process_index * count:(self.process_index + 1) * count])
    return rows if self.transform is None else self.transform(rows, step, self.process_index * count)


def num_windows(num_tokens: int, seq_len: int) -> int:
  return max(0, (num_tokens - 1) // seq_len)


class StoreBatches:
  """This process's training batches from a store, endless (epoch after epoch), through grain.

  Batch b of the run is global batch b of the shuffled window stream, on any number of processes.
  The state is JSON: where the pipeline was (re)started and grain's own iterator state after it.
  Setting `step` seeks (rebuilds the pipeline from that batch), which also serves a resume on a
  different number of processes, where grain's per-process states do not apply.
  """

  def __init__(self, path: str, num_tokens: int, *, seq_len: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, workers: int = 0, threads: int = 2,
               prefetch: int = 4, step: int = 0, packer: Packer | None = None, transform=None,
               weights: bool = False):
    split = _Split(path, "train", weights)
    self._packed = packer is not None
    if self._packed:
      self._count, rows = packer.rows_per_epoch, _Packed(split, packer)
    else:
      self._count, rows = num_windows(num_tokens, seq_len), _Windows(split, seq_len)
    self._batch = _LocalBatch(rows, process_index, process_count, transform)
    self._batch_size, self._seed, self._workers = batch_size, seed, workers
    self._threads, self._prefetch = threads, prefetch
    self._open(step)

  def _open(self, start: int) -> None:
    if self._packed:  # (the packer shuffles documents; rows are numbered over all epochs)
      ds = grain.MapDataset.range(self._count * EPOCH_LIMIT)
    else:
      ds = grain.MapDataset.range(self._count).shuffle(seed=self._seed).repeat()
    ds = ds.batch(self._batch_size, drop_remainder=True).map_with_index(self._batch)  # (index: the step)
    ds = ds[start:]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._threads,
                                                   prefetch_buffer_size=self._prefetch))
    if self._workers:
      if not absl.flags.FLAGS.is_parsed():
        absl.flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (STACK-NOTES)
      iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    self._start, self._consumed, self._iterator = start, 0, iter(iter_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._consumed += 1
    return batch

  @property
  def step(self) -> int:
    return self._start + self._consumed

  @step.setter
  def step(self, step: int) -> None:
    if step != self.step:
      self._open(step)

  def get_state(self) -> bytes:
    return json.dumps({"start": self._start, "step": self.step, "workers": self._workers,
                       "grain": self._iterator.get_state()}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    if saved.get("workers", 0) != self._workers:  # grain's state differs with workers; seeking is exact
      self._open(saved["step"])
      return
    self._open(saved["start"])
    self._iterator.set_state(saved["grain"])
    self._consumed = saved["step"] - saved["start"]

  def start_prefetch(self) -> None:
    """Part of grain's checkpoint protocol; prefetching starts with the first batch."""
