"""`jaxlm prepare`: text files, folders and JSONL (optionally .gz) -> a token store (store.py).

The corpus streams through in bounded memory, whatever its size: this process reads the documents in
order and groups them into units of ~8 MB of text; worker processes tokenize the units (at most two each
in flight), and the tokens are appended to the store's arrays in document order as units come back. Each
document ends with EOS. Documents go to validation with probability `val_fraction`, decided by (seed,
document number), so the store does not depend on units or workers. A corpus with too few documents for
that (e.g. one text file) is split by tokens instead: the last `val_fraction` of its tokens. A local store
is built in a temporary folder and renamed into place (a later prepare removes the folder of a killed
one); on a URL, meta.json is removed first and written last. Either way, a killed prepare leaves nothing
that training accepts.

With `pairs` (a prompt and a response field), each JSONL line is one fine-tuning example, stored as one
document: the prompt's tokens, the response's, EOS. A `weights` array beside the tokens says where the
loss goes: 0 on the prompt, 1 on the response and its EOS. Examples are never cut: if one split gets
none, the other's last example moves to it.
"""

import collections
import dataclasses
import functools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from jaxlm.data import readers, store
from jaxlm.data.tokenizer import ByteTokenizer, load_tokenizer_json
from jaxlm.errors import UserError

BPE_SAMPLE_BYTES = 200_000_000  # BPE trains on at most this much text (the first documents)
UNIT_BYTES = 8_000_000  # characters of text per work unit: big enough to amortize sending it to a worker


def make_tokenizer(spec: str, files: list[str], read):
  """`byte`, `bpe:VOCAB` (trained on the corpus, `read` as in _units) or the path of a tokenizer.json."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("bpe:"):
    from jaxlm.data.bpe import BPETokenizer

    try:
      vocab = int(spec[4:])
    except ValueError:
      raise UserError(f"--tokenizer={spec}: the vocabulary size is not a number", "e.g. --tokenizer=bpe:8192") from None
    return BPETokenizer.train(_sample(files, read), vocab)
  if not os.path.isfile(spec):
    raise UserError(f"--tokenizer={spec} is neither byte, bpe:VOCAB nor an existing file",
                    "give byte, bpe:8192 or the path of a tokenizer.json")
  with open(spec) as f:
    return load_tokenizer_json(f.read(), spec)


def _sample(files, read):
  """The texts of the first documents (of examples: their prompts and responses), BPE_SAMPLE_BYTES in all."""
  seen = 0
  for path in files:
    for doc in read(path):
      for text in _texts(doc):
        yield text
        seen += len(text)
      if seen >= BPE_SAMPLE_BYTES:
        return


def _texts(doc: str | tuple[str, str]) -> tuple[str, ...]:
  """The texts of a document, or of a (prompt, response) example."""
  return (doc,) if isinstance(doc, str) else doc


def _reader(text_field: str, pairs: tuple[str, str] | None, strict_utf8: bool):
  """path, [stats] -> the documents of that file, or its (prompt, response) examples when `pairs`."""
  if pairs:
    return functools.partial(readers.iter_pairs, fields=pairs, strict_utf8=strict_utf8)
  return functools.partial(readers.iter_documents, text_field=text_field, strict_utf8=strict_utf8)


@dataclasses.dataclass
class _Unit:
  """A run of consecutive documents (or examples), tokenized in one call: it goes out with `documents` and
  comes back with `arrays`, (split, "tokens" or "weights") -> its documents' values there, one after
  another, and `lengths`, split -> the lengths of its documents there."""

  first: int  # the number of its first document
  position: int  # input bytes read by its end, for the progress bar
  documents: list[str] | list[tuple[str, str]] | None
  arrays: dict[tuple[str, str], np.ndarray] | None = None
  lengths: dict[str, np.ndarray] | None = None


class _Encoder:
  """Tokenizes a unit (each document ends with EOS; an example is its prompt, its response, EOS, with
  weights 0 on the prompt, else 1) and sends each document to train or validation."""

  def __init__(self, tokenizer, dtype, seed: int, val_fraction: float, pairs: bool = False):
    self.tokenizer, self.dtype, self.seed, self.val_fraction = tokenizer, np.dtype(dtype), seed, val_fraction
    self.pairs = pairs

  def _encode(self, texts: list[str], eos: bool) -> list[np.ndarray]:
    if hasattr(self.tokenizer, "encode_batch"):
      return self.tokenizer.encode_batch(texts, eos=eos)
    return [self.tokenizer.encode(text, eos=eos) for text in texts]

  def __call__(self, unit: _Unit) -> _Unit:
    docs = unit.documents
    values = {}  # name -> one array per document
    if self.pairs:
      # Encoded apart, so the boundary between prompt and response is exact.
      prompts = self._encode([prompt for prompt, _ in docs], eos=False)
      responses = self._encode([response for _, response in docs], eos=True)
      values["tokens"] = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
      values["weights"] = [np.repeat(np.array([0, 1], np.uint8), [len(p), len(r)])
                           for p, r in zip(prompts, responses)]
    else:
      values["tokens"] = self._encode(docs, eos=True)
    # Decided by (seed, document number) alone, so the split does not depend on units or workers.
    to_val = [np.random.default_rng([self.seed, n]).random() < self.val_fraction
              for n in range(unit.first, unit.first + len(docs))]
    arrays, lengths = {}, {}
    for split, wanted in (("train", False), ("validation", True)):
      mine = [i for i, v in enumerate(to_val) if v == wanted]
      for name, per_doc in values.items():
        dtype = self.dtype if name == "tokens" else np.uint8
        arrays[split, name] = np.concatenate([np.zeros(0, dtype), *(per_doc[i] for i in mine)]).astype(dtype)
      lengths[split] = np.array([len(values["tokens"][i]) for i in mine], np.int64)
    return dataclasses.replace(unit, documents=None, arrays=arrays, lengths=lengths)


_worker_encoder = None  # the _Encoder of a pool worker process, set once when it starts


def _start_worker(encoder: _Encoder) -> None:
  """Runs once in each pool worker. The workers are the parallelism: without this, each one's
  `encode_batch` would start a thread per core, workers x cores threads in all."""
  global _worker_encoder
  _worker_encoder = encoder
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_in_worker(unit: _Unit) -> _Unit:
  return _worker_encoder(unit)


def _in_order(pool, fn, tasks, limit: int):
  """fn(task) for each task, in order, computed by the pool with at most `limit` tasks submitted and not
  yet consumed: `tasks` is pulled only as results are taken, so memory stays bounded."""
  pending = collections.deque()
  for task in tasks:
    if len(pending) == limit:
      yield pending.popleft().get()
    pending.append(pool.apply_async(fn, (task,)))
  while pending:
    yield pending.popleft().get()


def _file_share(path: str, read: int) -> int:
  """How many bytes of the file at `path` reading `read` bytes of its text stands for (estimated for .gz
  from its trailer, which holds the uncompressed size modulo 4 GiB)."""
  size = os.path.getsize(path)
  if path.lower().endswith(".gz") and size >= 4:
    with open(path, "rb") as f:
      f.seek(-4, os.SEEK_END)
      whole = int.from_bytes(f.read(4), "little")
    read = read * size // max(whole, 1)
  return min(read, size)


def _units(files: list[str], read, stats: readers.ReadStats, unit_bytes: int):
  """The documents of `files` (`read(path, stats=stats)`: those of a file), in order, in _Units of about
  `unit_bytes` characters (a unit ends with the document that reaches it); `stats` counts what was read."""
  docs, size, number, done = [], 0, 0, 0
  for path in files:
    start = stats.bytes
    for doc in read(path, stats=stats):
      docs.append(doc)
      size += sum(map(len, _texts(doc)))
      if size >= unit_bytes:
        yield _Unit(number, done + _file_share(path, stats.bytes - start), docs)
        number, docs, size = number + len(docs), [], 0
    done += os.path.getsize(path)
  if docs:
    yield _Unit(number, done, docs)


def prepare(inputs: list[str], output: str, *, tokenizer: str = "byte", text_field: str = "text",
            pairs: tuple[str, str] | None = None, val_fraction: float = 0.01, overwrite: bool = False,
            strict_utf8: bool = False, workers: int = 1, seed: int = 0, progress: bool = True,
            unit_bytes: int = UNIT_BYTES, buffer_chunks: int = 16) -> dict:
  """Writes the store (of fine-tuning examples when `pairs` names their prompt and response fields);
  returns its meta.json contents. The text is read once, `unit_bytes` at a time, and tokens reach the
  store `buffer_chunks` chunks at a time, so memory does not grow with the corpus."""
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"--val_fraction must be in (0, 1), got {val_fraction}", "e.g. --val_fraction=0.01")
  if workers < 1:
    raise UserError(f"--workers must be at least 1, got {workers}", "e.g. --workers=2")
  if pairs is not None:
    pairs = _check_pairs(pairs, text_field)
  files = readers.list_inputs(inputs)
  if pairs:
    for path in files:
      readers.require_jsonl(path)
  _check_output(output, overwrite)
  if not store.is_url(output):
    _remove_leftovers(output)
  begin = time.monotonic()
  read = _reader(text_field, pairs, strict_utf8)
  tok = make_tokenizer(tokenizer, files, read)
  target = _start_output(output)
  try:
    encoder = _Encoder(tok, store.token_dtype(tok.vocab_size), seed, val_fraction, pairs=pairs is not None)
    splits, stats = _tokenize(files, target, encoder, read, workers, unit_bytes, buffer_chunks,
                              begin if progress else None)
    if pairs and stats.documents < 2:
      raise UserError(f"--pairs needs at least 2 examples, and {', '.join(inputs)} has {stats.documents}",
                      "one for training and one for validation")
    if stats.documents == 0 or not any(s["tokens"] > s["documents"] for s in splits.values()):
      raise UserError(f"no text in {', '.join(inputs)}", "give files with text in them")
    split_by = "document"
    if not splits["train"]["documents"] or not splits["validation"]["documents"]:
      if pairs:
        splits = _move_last_example(target, splits, encoder.dtype)
      else:
        splits, split_by = _split_by_tokens(target, splits, encoder.dtype, val_fraction), "tokens"
    sources = {"inputs": list(inputs), "files": stats.files, "bytes": stats.bytes,
               "invalid_utf8_replaced": stats.replaced, **({} if pairs else {"text_field": text_field})}
    return _commit(output, target, tok, {
        "split_by": split_by, "val_fraction": val_fraction, "seed": seed, "sources": sources,
        **({"pairs": list(pairs)} if pairs else {}), "seconds": round(time.monotonic() - begin, 3),
        "splits": splits})
  except Exception:
    if target != output:  # a mistake in the input, not a kill: leave no partial folder behind
      shutil.rmtree(target, ignore_errors=True)
    raise


def _check_pairs(pairs, text_field: str) -> tuple[str, str]:
  if len(pairs) != 2 or not all(pairs) or pairs[0] == pairs[1]:
    raise UserError(f"--pairs={','.join(pairs)} is not two different field names",
                    "give PROMPT,RESPONSE, e.g. --pairs=prompt,response")
  if text_field != "text":
    raise UserError(f"--pairs and --text_field={text_field} do not go together",
                    "--pairs names both fields; drop --text_field")
  return tuple(pairs)


def _tokenize(files, target, encoder, read, workers, unit_bytes, buffer_chunks, begin):
  """Streams the documents of `files` (`read` as in _units) through `encoder` into the splits' token (and
  weight) arrays, and writes their offsets. Returns (split -> {"documents", "tokens", "crc32"}, and for
  pairs "weights_crc32", "weighted_tokens"; ReadStats). Progress is shown unless `begin` (when prepare
  began) is None."""
  names = {"tokens": encoder.dtype, **({"weights": np.uint8} if encoder.pairs else {})}
  writers = {(s, name): store.ArrayWriter(target, f"{s}/{name}", dtype, buffer_chunks)
             for s in store.SPLITS for name, dtype in names.items()}
  lengths = {s: [] for s in store.SPLITS}  # 8 bytes per document
  weighted = dict.fromkeys(store.SPLITS, 0)
  stats = readers.ReadStats()
  units = _units(files, read, stats, unit_bytes)
  total = sum(os.path.getsize(f) for f in files)
  shown = 0.0
  # spawn, not fork: the parent holds tensorstore's and the tokenizer library's threads
  pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(encoder,))
          if workers > 1 else None)
  try:
    for unit in _in_order(pool, _encode_in_worker, units, 2 * workers) if pool else map(encoder, units):
      for (split, name), values in unit.arrays.items():
        writers[split, name].append(values)
        if name == "weights":
          weighted[split] += int(np.count_nonzero(values))
      for split, sizes in unit.lengths.items():
        lengths[split].append(sizes)
      if begin is not None and time.monotonic() - shown > 0.5:
        _bar(unit.position, total, begin)
        shown = time.monotonic()
  finally:
    if pool:
      pool.terminate()
    for writer in writers.values():  # nothing may land in a partial folder after it is removed
      writer.wait()
  if begin is not None:
    _bar(total, total, begin)
    if sys.stdout.isatty():
      print()
  splits = {}
  for split in store.SPLITS:
    for name in names:
      writers[split, name].close()
    sizes = np.concatenate([np.zeros(0, np.int64), *lengths[split]])
    store.write_array(target, f"{split}/offsets", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    tokens = writers[split, "tokens"]
    splits[split] = {"documents": len(sizes), "tokens": tokens.length, "crc32": tokens.crc32}
    if encoder.pairs:
      splits[split].update(weights_crc32=writers[split, "weights"].crc32, weighted_tokens=weighted[split])
  return splits, stats


def _move(target: str, name: str, dtype, source: str, other: str, moved: tuple[int, int],
          kept: tuple[int, int]) -> tuple[store.ArrayWriter, int]:
  """Writes elements `moved` of the source split's array `name` as the other split's, a block at a time,
  then cuts the source's down to elements `kept`. Returns the other's writer (its length and crc32) and
  the crc32 of what the source kept."""
  writer = store.ArrayWriter(target, f"{other}/{name}", dtype)
  for block in store.read_blocks(target, f"{source}/{name}", *moved):
    writer.append(block)
  writer.close()
  return writer, store.keep_range(target, f"{source}/{name}", *kept)


def _other(split: str) -> str:
  return "validation" if split == "train" else "train"


def _split_by_tokens(target: str, splits: dict, dtype, val_fraction: float) -> dict:
  """The one nonempty split's N tokens cut at int(N * (1 - val_fraction)): the head is training, the tail
  validation, each one document."""
  source = "train" if splits["train"]["tokens"] else "validation"
  other = _other(source)
  count = splits[source]["tokens"]
  cut = int(count * (1.0 - val_fraction))
  moved, kept = ((cut, count), (0, cut)) if source == "train" else ((0, cut), (cut, count))
  writer, crc = _move(target, "tokens", dtype, source, other, moved, kept)
  out = {other: {"documents": 1, "tokens": writer.length, "crc32": writer.crc32},
         source: {"documents": 1, "tokens": kept[1] - kept[0], "crc32": crc}}
  for split, counts in out.items():
    store.write_array(target, f"{split}/offsets", np.array([0, counts["tokens"]], np.int64))
  return {split: out[split] for split in store.SPLITS}


def _move_last_example(target: str, splits: dict, dtype) -> dict:
  """The last example of the one nonempty split (it has at least 2) moves to the empty one, whole."""
  source = "train" if splits["train"]["documents"] else "validation"
  other = _other(source)
  count = splits[source]["documents"]
  start, stop = (int(i) for i in next(store.read_blocks(target, f"{source}/offsets", count - 1, count + 1)))
  tokens, tokens_crc = _move(target, "tokens", dtype, source, other, (start, stop), (0, start))
  weights, weights_crc = _move(target, "weights", np.uint8, source, other, (start, stop), (0, start))
  moved_weighted = sum(int(np.count_nonzero(block))
                       for block in store.read_blocks(target, f"{other}/weights", 0, stop - start))
  store.keep_range(target, f"{source}/offsets", 0, count)
  store.write_array(target, f"{other}/offsets", np.array([0, stop - start], np.int64))
  out = {other: {"documents": 1, "tokens": tokens.length, "crc32": tokens.crc32,
                 "weights_crc32": weights.crc32, "weighted_tokens": moved_weighted},
         source: {"documents": count - 1, "tokens": start, "crc32": tokens_crc, "weights_crc32": weights_crc,
                  "weighted_tokens": splits[source]["weighted_tokens"] - moved_weighted}}
  return {split: out[split] for split in store.SPLITS}


def _remove_leftovers(output: str) -> None:
  """Removes the temporary folders of earlier prepares to `output` that were killed before they finished."""
  parent = os.path.dirname(os.path.abspath(output))
  prefix = os.path.basename(os.path.abspath(output)) + ".partial-"
  for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
    path = os.path.join(parent, name)
    if name.startswith(prefix) and os.path.isdir(path):
      print(f"jaxlm: warning: removing {path} left by an interrupted prepare", file=sys.stderr, flush=True)
      shutil.rmtree(path)


def _start_output(output: str) -> str:
  """Where to write: a new temporary folder beside a local `output`; a URL itself, its meta.json removed
  first, so a store being replaced is refused until it is complete."""
  if store.is_url(output):
    store.open_kvstore(output).write(store.META, None).result()
    return output
  parent = os.path.dirname(os.path.abspath(output))
  try:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(output)) + ".partial-", dir=parent)
  except OSError as e:  # a file where a folder should be, no permission, a read-only filesystem
    raise UserError(f"cannot create --output={output}: {e.strerror} ({e.filename})",
                    "give a path in a writable folder") from None


def _commit(output: str, target: str, tok, meta: dict) -> dict:
  """Writes the tokenizer and meta.json (last), then renames a local store into place."""
  store.open_kvstore(target).write(store.TOKENIZER, tok.to_json().encode()).result()
  meta = {**meta, "tokenizer": {"type": tok.name, "vocab_size": tok.vocab_size},
          "dtype": np.dtype(store.token_dtype(tok.vocab_size)).name, "eos_after_document": True}
  store.write_meta(target, meta)
  if target != output:
    if os.path.exists(output):  # --overwrite was given (checked before any work)
      shutil.rmtree(output)
    os.replace(target, output)
  return {"format": store.FORMAT, "version": store.VERSION, **meta}


def _check_output(output: str, overwrite: bool) -> None:
  if store.is_url(output):
    exists = store.open_kvstore(output).read(store.META).result().state == "value"
  else:
    exists = os.path.exists(output) and (not os.path.isdir(output) or bool(os.listdir(output)))
    if os.path.exists(output) and not os.path.isdir(output):
      raise UserError(f"--output={output} is a file", "give a folder path for the store")
    above = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(above):
      above = os.path.dirname(above)
    if not os.path.isdir(above):
      raise UserError(f"--output={output} is under {above}, which is a file", "give a path in a folder")
  if exists and not overwrite:
    raise UserError(f"--output={output} already exists", "add --overwrite to replace it, or choose another path")


def _bar(done: int, total: int, begin: float) -> None:
  share = done / max(total, 1)
  seconds = time.monotonic() - begin
  rate = done / 1e6 / max(seconds, 1e-9)
  line = f"prepare [{'#' * int(share * 30):<30}] {share:6.1%}  {done / 1e6:,.1f}/{total / 1e6:,.1f} MB  {rate:,.1f} MB/s"
  sys.stdout.write("\r" + line if sys.stdout.isatty() else line + "\n")
  sys.stdout.flush()
