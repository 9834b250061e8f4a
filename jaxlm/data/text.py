"""Text corpora as token arrays, and the rows every objective trains on.

A row is `tokens`: seq_len + 1 consecutive tokens (the first is context: the token before the row), and,
where the data has them, `segment_ids`, `positions` and loss `weights` for the last seq_len. What the
model sees and predicts is the objective's business (objectives/): it turns rows into batches.

Rows are a pure function of (seed, step): resuming at step s gives exactly the rows an uninterrupted run
would have seen, and every process computes the same global batch indices and keeps only its own rows,
so hosts never need to talk about data.
"""

import dataclasses
import json
import os

import numpy as np

from jaxlm.data.fairytales import generate_fairy_tales
from jaxlm.data.packing import Packer
from jaxlm.data.store import TokenStore, is_store
from jaxlm.data.tokenizer import ByteTokenizer, load_tokenizer_json
from jaxlm.data.readers import decode_utf8
from jaxlm.errors import UserError, warn

_VAL_STREAM = 1  # separates the validation window stream from the training one


def read_text(path: str) -> str:
  """A UTF-8 text file. A few bad bytes become U+FFFD (counted in a warning) rather than stopping a
  long run; a file that is not text (NUL bytes, mostly invalid UTF-8: a binary, UTF-16) is refused."""
  if not os.path.exists(path):
    raise UserError(f"data file {path} does not exist", "check --config.data.path")
  if path.lower().endswith((".jsonl", ".gz")):  # (as text it would train on JSON syntax or gzip bytes)
    raise UserError(f"data file {path} is {'JSONL' if path.lower().endswith('.jsonl') else 'compressed'}, "
                    "not plain text", f"prepare it into a store: jaxlm prepare --input={path} --output=DIR, "
                    "then give DIR")
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise UserError(f"cannot read data file {path}: {e.strerror}", "check its permissions") from None
  if not raw.strip():
    raise UserError(f"data file {path} is empty", "give a file with text in it")
  text, replaced = decode_utf8(raw, strict=False, where=path)
  nul = raw.count(0)
  if nul * 100 > len(raw) or replaced * 10 > len(raw):  # text has no NULs and few bad sequences
    raise UserError(f"data file {path} is not UTF-8 text: {nul:,} NUL bytes and {replaced:,} invalid UTF-8 "
                    f"sequences in {len(raw):,} bytes", "give a UTF-8 text file (`iconv -t utf-8` converts)")
  if replaced:
    warn(f"data file {path}: {replaced:,} invalid UTF-8 sequences replaced by U+FFFD "
         "(`jaxlm prepare --strict_utf8` finds them)")
  return text


@dataclasses.dataclass
class Corpus:
  """What training reads: a text's tokens in memory, or a store's training split read through grain."""

  tokenizer: object
  val_tokens: np.ndarray
  source: str
  train_tokens: np.ndarray | None = None  # a text file or the fairy tales
  store: str | None = None  # a prepared token store
  train_count: int = 0  # tokens in the training split
  packed: bool = False  # rows of packed documents (a store), not windows
  train_offsets: np.ndarray | None = None  # where each document starts (a store)
  val_offsets: np.ndarray | None = None
  pairs: tuple[str, str] | None = None  # a pairs store's fields: per-token loss weights (SFT)
  val_weights: np.ndarray | None = None  # the validation split's loss weights (a pairs store)

  def train_batches(self, *, workers: int = 0, transform=None, packer=None, **batch_kwargs):
    """This process's training batches (a checkpointable iterator) from step 0: rows, or
    `transform(rows, step, first_row)` of them (an objective's batches). `packer`: an objective's own
    packing of the store's documents (seq2seq examples) instead of data.sequences'."""
    if self.store is not None:
      from jaxlm.data.pipeline import StoreBatches

      if packer is None and self.packed:
        packer = Packer(self.train_offsets, batch_kwargs["seq_len"], batch_kwargs["seed"], self.tokenizer.EOS)
      return StoreBatches(self.store, self.train_count, workers=workers, packer=packer, transform=transform,
                          weights=self.pairs is not None, **batch_kwargs)
    return TrainBatches(self.train_tokens, transform=transform, **batch_kwargs)

  def train_examples(self) -> tuple[np.ndarray, np.ndarray]:
    """The training split's document offsets and loss weights (a pairs store), for packing examples."""
    store = TokenStore(self.store)
    return store.offsets("train"), store.read_weights("train")

  def eval_batches(self, *, num_batches: int, seq_len: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1, packer=None) -> list[dict[str, np.ndarray]]:
    """A fixed set of validation rows (this process's part of each batch), the same at every evaluation.
    `packer`: an objective's own packer of the validation split's documents."""
    if packer is not None:
      return [_process_rows(packer.rows_from_array(range(i * batch_size, (i + 1) * batch_size), self.val_tokens,
                                                   self.val_weights), process_index, process_count)
              for i in range(num_batches)]
    if not self.packed:
      return eval_batches(self.val_tokens, num_batches=num_batches, seq_len=seq_len, batch_size=batch_size,
                          seed=seed, process_index=process_index, process_count=process_count,
                          weights=self.val_weights)
    packer = Packer(self.val_offsets, seq_len, seed, self.tokenizer.EOS, stream=_VAL_STREAM)
    return [_process_rows(packer.rows_from_array(range(i * batch_size, (i + 1) * batch_size), self.val_tokens,
                                                 self.val_weights),
                          process_index, process_count) for i in range(num_batches)]


def load_data(data_config) -> Corpus:
  """The corpus of `data.path`.

  A prepared token store (a folder or URL, see store.py) brings its own tokenizer and split, and its
  training split is read through the grain pipeline (pipeline.py); a text file, or the built-in fairy
  tales when the path is empty, is byte-tokenized and its last `val_fraction` is validation.
  """
  path, packed = data_config.path, data_config.sequences == "packed"
  if path and is_store(path):
    token_store = TokenStore(path)
    tokenizer = load_tokenizer_json(token_store.tokenizer_json, f"{path}/tokenizer.json")
    val, val_offsets = token_store.read("validation")
    count = token_store.meta["splits"]["train"]["tokens"]
    _check_lengths(count, len(val), data_config.seq_len, path)
    train_offsets = token_store.offsets("train") if packed else None
    pairs = token_store.pairs
    val_weights = token_store.read_weights("validation") if pairs is not None else None
    return Corpus(tokenizer, val, path, store=path, train_count=count, packed=packed,
                  train_offsets=train_offsets, val_offsets=val_offsets, pairs=pairs, val_weights=val_weights)
  if packed:
    raise UserError(f"data.sequences=packed packs the documents of a prepared token store; "
                    f"{path or 'the built-in corpus'} is plain text",
                    "run `jaxlm prepare --input=FILES --output=DIR` and train with --config.data.path=DIR, "
                    "or use --config.data.sequences=windows")
  tokenizer = ByteTokenizer()
  train, val, source = load_corpus(data_config, tokenizer)
  return Corpus(tokenizer, val, source, train_tokens=train, train_count=len(train))


def load_corpus(data_config, tokenizer) -> tuple[np.ndarray, np.ndarray, str]:
  """(train tokens, validation tokens, description): validation is the last `val_fraction` of the text."""
  if data_config.path:
    text, source = read_text(data_config.path), data_config.path
  else:
    text, source = generate_fairy_tales(data_config.fairytale_bytes, seed=0), "built-in fairy tales"
  tokens = tokenizer.encode(text).astype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
  split = int(len(tokens) * (1.0 - data_config.val_fraction))
  train, val = tokens[:split], tokens[split:]
  _check_lengths(len(train), len(val), data_config.seq_len, source)
  return train, val, source


def _check_lengths(train: int, val: int, seq_len: int, source: str) -> None:
  need = seq_len + 1
  for name, count in (("training", train), ("validation", val)):
    if count < need:
      raise UserError(
          f"{source} is too short: its {name} split has {count} tokens, fewer than one sequence "
          f"(data.seq_len + 1 = {need})", "use a longer file or a shorter --config.data.seq_len")


def window_rows(tokens: np.ndarray, starts: np.ndarray, seq_len: int,
                weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Rows of the windows of seq_len + 1 tokens starting at `starts` (weights: of their last seq_len)."""
  at = starts[:, None] + np.arange(seq_len + 1)
  rows = {"tokens": tokens[at].astype(np.int32)}
  if weights is not None:
    rows["weights"] = weights[at[:, 1:]].astype(np.float32)
  return rows


def _window_starts(num_tokens: int, seq_len: int, batch_size: int, seed: int, stream: int,
                   index: int) -> np.ndarray:
  rng = np.random.default_rng([seed, stream, index])
  return rng.integers(0, num_tokens - seq_len, size=batch_size)


def _process_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict:
  rows = len(next(iter(batch.values()))) // process_count
  return {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def first_row(batch_size: int, process_index: int, process_count: int) -> int:
  """The global row number of this process's first row in each batch."""
  return process_index * (batch_size // process_count)


def train_batch(tokens: np.ndarray, step: int, *, seq_len: int, batch_size: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global training batch for `step`: random windows, seeded by (seed, step)."""
  starts = _window_starts(len(tokens), seq_len, batch_size, seed, 0, step)
  return _process_rows(window_rows(tokens, starts, seq_len), process_index, process_count)


class TrainBatches:
  """This process's training batches, step after step; its state (the next step) is checkpointed.

  The rows of a step are a pure function of (seed, step), and so is `transform(rows, step, first_row)`
  (an objective's batch), so the state is just the step. It follows the iterator protocol grain's
  checkpoint handler expects (get_state/set_state as JSON bytes).
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, step: int = 0, transform=None):
    self.tokens, self.step, self.transform = tokens, step, transform
    self._first_row = first_row(batch_size, process_index, process_count)
    self._kwargs = dict(seq_len=seq_len, batch_size=batch_size, seed=seed,
                        process_index=process_index, process_count=process_count)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = train_batch(self.tokens, self.step, **self._kwargs)
    if self.transform is not None:
      rows = self.transform(rows, self.step, self._first_row)
    self.step += 1
    return rows

  def get_state(self) -> bytes:
    return json.dumps({"step": self.step, "seed": self._kwargs["seed"]}).encode()

  def set_state(self, state: bytes) -> None:
    self.step = int(json.loads(state)["step"])  # a changed seed is a config change, checked elsewhere

  def start_prefetch(self) -> None:
    """Part of the protocol; batches are cut on demand."""


def eval_batches(tokens: np.ndarray, *, num_batches: int, seq_len: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 weights: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
  """A fixed set of validation rows, the same at every evaluation, so val_loss curves compare."""
  out = []
  for i in range(num_batches):
    starts = _window_starts(len(tokens), seq_len, batch_size, seed, _VAL_STREAM, i)
    out.append(_process_rows(window_rows(tokens, starts, seq_len, weights), process_index, process_count))
  return out
