"""The token store `jaxlm prepare` writes and training reads: tensorstore zarr3 arrays plus meta.json.

  STORE/meta.json                 format and version, tokenizer, counts, checksums (written last)
  STORE/tokenizer.json            the tokenizer (bytes, or a Hugging Face tokenizer.json)
  STORE/{train,validation}/tokens     1-D uint16 or uint32: the documents, each followed by EOS
  STORE/{train,validation}/offsets    1-D int64, documents + 1 entries: where each document starts

STORE is a local folder or a tensorstore key-value URL (`gs://bucket/path/`, `memory://name/`). A store
without meta.json, or of another format version, is refused: meta.json is the commit record, so a
killed `prepare` never leaves a store that training accepts.
"""

import json
import os
import zlib

import numpy as np
import tensorstore as ts

from jaxlm.errors import UserError

FORMAT, VERSION = "jaxlm-token-store", 1
SPLITS = ("train", "validation")
META, TOKENIZER = "meta.json", "tokenizer.json"
CHUNK = 1 << 16  # tokens per zarr chunk: a random window decompresses at most two of them
# One per process, so memory:// stores are visible to every reader in it; decompressed chunks stay
# cached, so neighbouring windows do not decompress the same chunk again.
CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


def is_url(path: str) -> bool:
  return "://" in path


def kvstore_url(path: str) -> str:
  """The tensorstore key-value URL of a store folder, ending in '/'."""
  url = path if is_url(path) else "file://" + os.path.abspath(path)
  return url if url.endswith("/") else url + "/"


def open_kvstore(path: str) -> ts.KvStore:
  try:
    return ts.KvStore.open(kvstore_url(path), context=CONTEXT).result()
  except (ValueError, RuntimeError) as e:
    raise UserError(f"cannot open {path}: {_first_line(e)}", "give a folder or a gs:// URL") from None


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_array(path: str, key: str, data: np.ndarray) -> None:
  """Writes a 1-D array as zarr3 at STORE/key (zstd-compressed chunks of CHUNK elements)."""
  spec = {"driver": "zarr3", "kvstore": kvstore_url(path) + key}
  array = ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(data.dtype.name),
                  shape=[len(data)], chunk_layout=ts.ChunkLayout(chunk_shape=[max(1, min(CHUNK, len(data)))]),
                  codec=ts.CodecSpec({"driver": "zarr3", "codecs": [{"name": "bytes"}, {"name": "zstd"}]}),
                  context=CONTEXT).result()
  step = 16 * CHUNK
  for start in range(0, len(data), step):
    stop = min(start + step, len(data))  # (tensorstore does not clamp slices)
    array[start:stop].write(data[start:stop]).result()


def write_meta(path: str, meta: dict) -> None:
  """meta.json, written last: it is what makes the store exist for training."""
  open_kvstore(path).write(META, json.dumps({"format": FORMAT, "version": VERSION, **meta},
                                            indent=2, sort_keys=True).encode()).result()


def crc32(data: np.ndarray) -> int:
  return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"))


class TokenStore:
  """A prepared store, opened for reading; `meta` is its meta.json."""

  def __init__(self, path: str):
    self.path = path
    kv = open_kvstore(path)
    raw = kv.read(META).result()
    if raw.state != "value":
      raise UserError(f"{path} is not a prepared token store (no {META}; an interrupted prepare leaves none)",
                      "run `jaxlm prepare --input=... --output=DIR` first, or give a text file")
    try:
      self.meta = json.loads(bytes(raw.value))
    except ValueError:
      raise UserError(f"{path}/{META} is not valid JSON", "prepare the store again with --overwrite") from None
    if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
      raise UserError(f"{path} is a store of format {self.meta.get('format')!r} version "
                      f"{self.meta.get('version')!r}; this jaxlm reads {FORMAT!r} version {VERSION}",
                      "prepare it again with this jaxlm (`jaxlm prepare ... --overwrite`)")
    tok = kv.read(TOKENIZER).result()
    if tok.state != "value":
      raise UserError(f"{path} has no {TOKENIZER}", "prepare the store again with --overwrite")
    self.tokenizer_json = bytes(tok.value).decode()

  def _open(self, split: str, name: str):
    spec = {"driver": "zarr3", "kvstore": kvstore_url(self.path) + f"{split}/{name}",
            "recheck_cached_data": False}  # a committed store does not change under us
    try:
      return ts.open(spec, open=True, context=CONTEXT).result()
    except (ValueError, RuntimeError) as e:
      raise UserError(f"{self.path}: cannot open {split}/{name} ({_first_line(e)})",
                      "the store is damaged; prepare it again with --overwrite") from None

  def tokens(self, split: str):
    """The split's token array as a tensorstore handle (index it, then .read().result())."""
    return self._open(split, "tokens")

  def offsets(self, split: str) -> np.ndarray:
    """Where each document of the split starts (documents + 1 entries), checked against meta.json."""
    offsets = self._open(split, "offsets").read().result()
    want = self.meta["splits"][split]
    if len(offsets) != want["documents"] + 1 or offsets[-1] != want["tokens"]:
      raise UserError(f"{self.path}: {split}/offsets has {len(offsets) - 1} documents ending at token "
                      f"{offsets[-1] if len(offsets) else 0}, meta.json says {want['documents']} and "
                      f"{want['tokens']}", "the store is damaged; prepare it again with --overwrite")
    return offsets

  def read(self, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of a split in memory, checked against meta.json's counts and checksum."""
    tokens = self._open(split, "tokens").read().result()
    offsets = self._open(split, "offsets").read().result()
    want = self.meta["splits"][split]
    if len(tokens) != want["tokens"] or len(offsets) != want["documents"] + 1:
      raise UserError(f"{self.path}: {split} has {len(tokens)} tokens and {len(offsets) - 1} documents, "
                      f"meta.json says {want['tokens']} and {want['documents']}",
                      "the store is damaged; prepare it again with --overwrite")
    if verify and crc32(tokens) != want["crc32"]:
      raise UserError(f"{self.path}: {split} tokens do not match their checksum in meta.json",
                      "the store is damaged; prepare it again with --overwrite")
    return tokens, offsets


def is_store(path: str) -> bool:
  """Whether `path` looks like a token store (a URL, or a folder): not whether it is a valid one."""
  return is_url(path) or os.path.isdir(path)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:200] if lines else type(e).__name__
