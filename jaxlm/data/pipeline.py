"""The grain pipeline that feeds training from a token store (store.py).

The training split is cut into windows of seq_len + 1 tokens (documents inside are separated by the
EOS each one ends with). Window numbers are shuffled by the seed, differently every epoch, and grouped
into global batches; each process keeps its own contiguous rows of every global batch and reads only
those windows from the store, in one batched tensorstore read. Reading runs ahead of training in
background threads (and optionally worker processes). The iterator's state is checkpointed with the
train state and restores exactly: the same next batches, with or without workers.

Because every process cuts the same global batches and keeps rows [p*L, (p+1)*L), the global batch
assembled with `jax.make_array_from_process_local_data` is the same on any number of processes.
"""

import json

import absl.flags
import grain
import numpy as np

from jaxlm.data import store


class _Windows:
  """Reads windows of `length` tokens starting at window_number * stride, from the store, on demand.

  Picklable: worker processes reopen the store lazily.
  """

  def __init__(self, path: str, split: str, length: int, stride: int):
    self.path, self.split, self.length, self.stride = path, split, length, stride
    self._tokens = None

  def __getstate__(self):
    return {**self.__dict__, "_tokens": None}

  def read(self, numbers: np.ndarray) -> np.ndarray:
    if self._tokens is None:
      self._tokens = store.TokenStore(self.path).tokens(self.split)
    futures = [self._tokens[int(n) * self.stride:int(n) * self.stride + self.length].read() for n in numbers]
    return np.stack([f.result() for f in futures]).astype(np.int32)


class _LocalRows:
  """Global batch of window numbers -> this process's rows as a training batch (inputs, targets)."""

  def __init__(self, windows: _Windows, process_index: int, process_count: int):
    self.windows, self.process_index, self.process_count = windows, process_index, process_count

  def __call__(self, numbers: np.ndarray) -> dict[str, np.ndarray]:
    rows = len(numbers) // self.process_count
    mine = numbers[self.process_index * rows:(self.process_index + 1) * rows]
    windows = self.windows.read(mine)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


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
               prefetch: int = 4, step: int = 0):
    self._windows = _Windows(path, "train", seq_len + 1, seq_len)
    self._count = num_windows(num_tokens, seq_len)
    self._rows = _LocalRows(self._windows, process_index, process_count)
    self._batch_size, self._seed, self._workers = batch_size, seed, workers
    self._threads, self._prefetch = threads, prefetch
    self._open(step)

  def _open(self, start: int) -> None:
    ds = (grain.MapDataset.range(self._count).shuffle(seed=self._seed).repeat()
          .batch(self._batch_size, drop_remainder=True))
    ds = ds[start:].map(self._rows)
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
    return json.dumps({"start": self._start, "step": self.step, "grain": self._iterator.get_state()}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    self._open(saved["start"])
    self._iterator.set_state(saved["grain"])
    self._consumed = saved["step"] - saved["start"]

  def start_prefetch(self) -> None:
    """Part of grain's checkpoint protocol; prefetching starts with the first batch."""
