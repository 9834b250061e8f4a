"""`jaxlm prepare`: text files, folders and JSONL (optionally .gz) -> a token store (store.py).

Files are tokenized in parallel worker processes, in order; each document ends with EOS. Documents go
to validation with probability `val_fraction`, decided by (seed, document number), so the split does
not depend on the number of workers. A corpus with too few documents for that (e.g. one text file) is
split by tokens instead: the last `val_fraction` of its tokens. A local store is built in a temporary
folder and renamed into place; on a URL, meta.json is written last. Either way, a killed prepare leaves
nothing that training accepts.
"""

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


def make_tokenizer(spec: str, files: list[str], text_field: str, strict_utf8: bool):
  """`byte`, `bpe:VOCAB` (trained on the corpus) or the path of an existing tokenizer.json."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("bpe:"):
    from jaxlm.data.bpe import BPETokenizer

    try:
      vocab = int(spec[4:])
    except ValueError:
      raise UserError(f"--tokenizer={spec}: the vocabulary size is not a number", "e.g. --tokenizer=bpe:8192") from None
    return BPETokenizer.train(_sample(files, text_field, strict_utf8), vocab)
  if not os.path.isfile(spec):
    raise UserError(f"--tokenizer={spec} is neither byte, bpe:VOCAB nor an existing file",
                    "give byte, bpe:8192 or the path of a tokenizer.json")
  with open(spec) as f:
    return load_tokenizer_json(f.read(), spec)


def _sample(files, text_field, strict_utf8):
  seen = 0
  for path in files:
    for doc in readers.iter_documents(path, text_field=text_field, strict_utf8=strict_utf8):
      yield doc
      seen += len(doc)
      if seen >= BPE_SAMPLE_BYTES:
        return


def _tokenize_file(args):
  """Worker: one file -> (token arrays of its documents, ReadStats)."""
  path, tokenizer, text_field, strict_utf8 = args
  stats = readers.ReadStats()
  docs = [tokenizer.encode(doc, eos=True)
          for doc in readers.iter_documents(path, text_field=text_field, strict_utf8=strict_utf8,
                                            stats=stats)]
  return docs, stats


def prepare(inputs: list[str], output: str, *, tokenizer: str = "byte", text_field: str = "text",
            val_fraction: float = 0.01, overwrite: bool = False, strict_utf8: bool = False,
            workers: int = 1, seed: int = 0, progress: bool = True) -> dict:
  """Writes the store; returns its meta.json contents."""
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"--val_fraction must be in (0, 1), got {val_fraction}", "e.g. --val_fraction=0.01")
  if workers < 1:
    raise UserError(f"--workers must be at least 1, got {workers}", "e.g. --workers=2")
  files = readers.list_inputs(inputs)
  _check_output(output, overwrite)
  begin = time.monotonic()
  tok = make_tokenizer(tokenizer, files, text_field, strict_utf8)
  dtype = store.token_dtype(tok.vocab_size)
  total_bytes = sum(os.path.getsize(f) for f in files)
  parts = {s: [] for s in store.SPLITS}
  stats, done_bytes, doc_number, shown = readers.ReadStats(), 0, 0, 0.0
  jobs = [(path, tok, text_field, strict_utf8) for path in files]
  # spawn, not fork: the parent holds tensorstore's and the tokenizer library's threads
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    results = pool.imap(_tokenize_file, jobs) if pool else map(_tokenize_file, jobs)
    for path, (docs, file_stats) in zip(files, results):
      for doc in docs:
        to_val = np.random.default_rng([seed, doc_number]).random() < val_fraction
        parts["validation" if to_val else "train"].append(doc.astype(dtype))
        doc_number += 1
      for field in ("files", "documents", "bytes", "replaced"):
        setattr(stats, field, getattr(stats, field) + getattr(file_stats, field))
      done_bytes += os.path.getsize(path)
      if progress and (time.monotonic() - shown > 0.5 or done_bytes == total_bytes):
        _bar(done_bytes, total_bytes, begin)
        shown = time.monotonic()
  finally:
    if pool:
      pool.terminate()
  if progress and sys.stdout.isatty():
    print()
  if stats.documents == 0 or not any(len(d) > 1 for p in parts.values() for d in p):
    raise UserError(f"no text in {', '.join(inputs)}", "give files with text in them")
  split_by = "document"
  if not parts["train"] or not parts["validation"]:
    parts, split_by = _split_by_tokens(parts["train"] + parts["validation"], val_fraction), "tokens"
  return _write(output, tok, parts, {
      "split_by": split_by, "val_fraction": val_fraction, "seed": seed,
      "sources": {"inputs": list(inputs), "files": stats.files, "bytes": stats.bytes,
                  "invalid_utf8_replaced": stats.replaced, "text_field": text_field},
      "seconds": round(time.monotonic() - begin, 3)}, overwrite)


def _split_by_tokens(docs: list[np.ndarray], val_fraction: float) -> dict:
  stream = np.concatenate(docs)
  cut = int(len(stream) * (1.0 - val_fraction))
  return {"train": [stream[:cut]], "validation": [stream[cut:]]}


def _write(output: str, tok, parts: dict, meta: dict, overwrite: bool) -> dict:
  local = not store.is_url(output)
  target = output
  if local:
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    target = tempfile.mkdtemp(prefix=os.path.basename(output.rstrip("/")) + ".partial-", dir=parent)
  splits = {}
  for split, docs in parts.items():
    tokens = np.concatenate(docs) if docs else np.zeros(0, store.token_dtype(tok.vocab_size))
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    store.write_array(target, f"{split}/tokens", tokens)
    store.write_array(target, f"{split}/offsets", offsets)
    splits[split] = {"documents": len(docs), "tokens": int(len(tokens)), "crc32": store.crc32(tokens)}
  store.open_kvstore(target).write(store.TOKENIZER, tok.to_json().encode()).result()
  meta = {**meta, "tokenizer": {"type": tok.name, "vocab_size": tok.vocab_size},
          "dtype": np.dtype(store.token_dtype(tok.vocab_size)).name, "eos_after_document": True,
          "splits": splits}
  store.write_meta(target, meta)
  if local:
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
  if exists and not overwrite:
    raise UserError(f"--output={output} already exists", "add --overwrite to replace it, or choose another path")


def _bar(done: int, total: int, begin: float) -> None:
  share = done / max(total, 1)
  seconds = time.monotonic() - begin
  rate = done / 1e6 / max(seconds, 1e-9)
  line = f"prepare [{'#' * int(share * 30):<30}] {share:6.1%}  {done / 1e6:,.1f}/{total / 1e6:,.1f} MB  {rate:,.1f} MB/s"
  sys.stdout.write("\r" + line if sys.stdout.isatty() else line + "\n")
  sys.stdout.flush()
