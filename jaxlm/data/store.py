"""The token store `jaxlm prepare` writes and training reads: tensorstore zarr3 arrays plus meta.json.

  STORE/meta.json                 format and version, tokenizer, counts, checksums (written last)
  STORE/tokenizer.json            the tokenizer (bytes, or a Hugging Face tokenizer.json)
  STORE/{train,validation}/tokens     1-D uint16 or uint32: the documents, each followed by EOS
  STORE/{train,validation}/offsets    1-D int64, documents + 1 entries: where each document starts
  STORE/{train,validation}/weights    1-D uint8, only in a store of fine-tuning pairs (meta.json "pairs"):
                                      per token, 0 on a prompt, 1 on a response and its EOS

STORE is a local folder or a tensorstore key-value URL (`gs://bucket/path/`, `memory://name/`). A store
without meta.json, or of another format version, is refused: meta.json is the commit record, so a
killed `prepare` never leaves a store that training accepts.
"""

import json
import os
import zlib

import numpy as np
import tensorstore as ts

from jaxlm.errors import UserError, first_line

FORMAT, VERSION = "jaxlm-token-store", 1
SPLITS = ("train", "validation")
META, TOKENIZER = "meta.json", "tokenizer.json"
CHUNK = 1 << 16  # tokens per zarr chunk: a random window decompresses at most two of them
# One per process, so memory:// stores are visible to every reader in it; decompressed chunks stay
# cached, so neighbouring windows do not decompress the same chunk again.
CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})
_DAMAGED = "the store is damaged; prepare it again with --overwrite"  # the hint of every damage
# Writing keeps no chunks cached (prepare's memory must not grow with what it wrote); same memory:// stores.
_WRITE_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}}, CONTEXT)


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
    raise UserError(f"cannot open {path}: {first_line(e)}", "give a folder or a gs:// URL") from None


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.uint32


_CODEC = ts.CodecSpec({"driver": "zarr3", "codecs": [{"name": "bytes"}, {"name": "zstd"}]})
_BLOCK = 16 * CHUNK  # elements per read or write call


def _blocks(start: int, stop: int):
  """(begin, end) of consecutive blocks of at most _BLOCK elements covering [start, stop)."""
  for begin in range(start, stop, _BLOCK):
    yield begin, min(begin + _BLOCK, stop)  # (tensorstore does not clamp slices)


def _create(path: str, key: str, dtype, length: int, chunk: int) -> ts.TensorStore:
  spec = {"driver": "zarr3", "kvstore": kvstore_url(path) + key}
  return ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(np.dtype(dtype).name), shape=[length],
                 chunk_layout=ts.ChunkLayout(chunk_shape=[chunk]), codec=_CODEC, context=_WRITE_CONTEXT).result()


def _open_writable(path: str, key: str) -> ts.TensorStore:
  spec = {"driver": "zarr3", "kvstore": kvstore_url(path) + key}
  return ts.open(spec, open=True, context=_WRITE_CONTEXT).result()


class ArrayWriter:
  """Appends to a 1-D zarr3 array at STORE/key (zstd-compressed chunks of CHUNK elements) that grows as
  data comes, so a corpus never has to fit in memory; keeps the crc32 of everything appended.

  Up to `buffer_chunks` chunks wait in memory, then every whole chunk is written once. An array that ends
  shorter than one chunk gets a single chunk of its own length: the files are those of writing it at once.
  """

  def __init__(self, path: str, key: str, dtype, buffer_chunks: int = 16):
    self.path, self.key, self.dtype = path, key, np.dtype(dtype)
    self.length, self.crc32 = 0, 0  # of everything appended
    self._limit = max(1, buffer_chunks) * CHUNK
    self._array = None  # created by the first flush
    self._written = 0  # elements flushed (a multiple of CHUNK until close)
    self._pending, self._pending_length = [], 0
    self._writing = (None, [])  # the data of the last flush and its write futures

  def append(self, data: np.ndarray) -> None:
    data = np.ascontiguousarray(data, self.dtype)
    self.crc32 = zlib.crc32(memoryview(data).cast("B"), self.crc32)
    self.length += len(data)
    self._pending.append(data)
    self._pending_length += len(data)
    if self._pending_length >= self._limit:
      self._flush(final=False)

  def close(self) -> None:
    """Writes what is left; the array then has exactly `length` elements."""
    self._flush(final=True)
    self.wait()

  def wait(self) -> None:
    """Returns once everything flushed so far is in storage."""
    for future in self._writing[1]:
      future.result()
    self._writing = (None, [])

  def _flush(self, final: bool) -> None:
    """Starts writing the pending whole chunks (all that is pending when `final`), and does not wait for
    it: they compress and reach storage while the caller tokenizes more."""
    pending = self._pending
    data = pending[0] if len(pending) == 1 else np.concatenate([np.zeros(0, self.dtype), *pending])
    stop = len(data) if final else len(data) // CHUNK * CHUNK
    end = self._written + stop
    self.wait()
    if self._array is None:
      self._array = _create(self.path, self.key, self.dtype, end, max(1, min(CHUNK, end)) if final else CHUNK)
    elif end > self._written:
      self._array = self._array.resize(exclusive_max=[end], expand_only=True).result()
    at = self._written
    self._writing = (data, [self._array[at + a:at + b].write(data[a:b]) for a, b in _blocks(0, stop)])
    self._written = end
    self._pending = [data[stop:]] if stop < len(data) else []
    self._pending_length = len(data) - stop


def write_array(path: str, key: str, data: np.ndarray) -> None:
  """Writes a 1-D array as zarr3 at STORE/key (zstd-compressed chunks of CHUNK elements)."""
  writer = ArrayWriter(path, key, data.dtype)
  writer.append(data)
  writer.close()


def read_blocks(path: str, key: str, start: int, stop: int):
  """Elements [start, stop) of the array at STORE/key, at most 16 chunks at a time."""
  array = _open_writable(path, key)
  for begin, end in _blocks(start, stop):
    yield array[begin:end].read().result()


def keep_range(path: str, key: str, start: int, stop: int) -> int:
  """Cuts the array at STORE/key down to its elements [start, stop), moved to the front, in place and a
  block at a time; its files end as if those elements had been written at once. Returns their crc32."""
  array = _open_writable(path, key)
  length = stop - start
  if length < CHUNK and array.chunk_layout.read_chunk.shape[0] != max(1, length):
    data = array[start:stop].read().result()  # under one chunk: a chunk of its own length, as write_array
    write_array(path, key, data)
    return crc32(data)
  crc = 0
  for begin, end in _blocks(start, stop):
    block = array[begin:end].read().result()
    if start:  # a forward copy: each block is read before anything overwrites it
      array[begin - start:end - start].write(block).result()
    crc = zlib.crc32(memoryview(block).cast("B"), crc)
  if length < array.shape[0]:
    # Shrinking keeps the old elements of the last, partial chunk: zero them, as a fresh write has them.
    chunk_end = min(array.shape[0], -(-length // CHUNK) * CHUNK)
    if chunk_end > length:
      array[length:chunk_end].write(np.zeros(chunk_end - length, array.dtype.numpy_dtype)).result()
    array.resize(exclusive_max=[length], shrink_only=True).result()
  return crc


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
      raise UserError(f"{self.path}: cannot open {split}/{name} ({first_line(e)})", _DAMAGED) from None

  def tokens(self, split: str):
    """The split's token array as a tensorstore handle (index it, then .read().result())."""
    return self._open(split, "tokens")

  @property
  def pairs(self) -> tuple[str, str] | None:
    """The (prompt, response) field names of a store of fine-tuning pairs, which has `weights`; else None."""
    pairs = self.meta.get("pairs")
    return None if pairs is None else tuple(pairs)

  def weights(self, split: str):
    """A pairs store's loss weights (uint8, one per token: 0 on prompts, 1 on responses and their EOS) as
    a tensorstore handle, like `tokens`."""
    if self.pairs is None:
      raise UserError(f"{self.path} is not a store of fine-tuning pairs (it has no loss weights)",
                      "prepare it with `jaxlm prepare --pairs=PROMPT,RESPONSE ...`")
    return self._open(split, "weights")

  def read_weights(self, split: str, verify: bool = True) -> np.ndarray:
    """A pairs store's loss weights of a split in memory, checked against meta.json's count and checksum."""
    weights = self.weights(split).read().result()
    want = self.meta["splits"][split]
    if len(weights) != want["tokens"]:
      raise UserError(f"{self.path}: {split} has {len(weights)} weights, meta.json says {want['tokens']}", _DAMAGED)
    if verify and crc32(weights) != want["weights_crc32"]:
      raise UserError(f"{self.path}: {split} weights do not match their checksum in meta.json", _DAMAGED)
    return weights

  def offsets(self, split: str) -> np.ndarray:
    """Where each document of the split starts (documents + 1 entries), checked against meta.json."""
    offsets = self._open(split, "offsets").read().result()
    want = self.meta["splits"][split]
    if len(offsets) != want["documents"] + 1 or offsets[-1] != want["tokens"]:
      raise UserError(f"{self.path}: {split}/offsets has {len(offsets) - 1} documents ending at token "
                      f"{offsets[-1] if len(offsets) else 0}, meta.json says {want['documents']} and "
                      f"{want['tokens']}", _DAMAGED)
    return offsets

  def read(self, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of a split in memory, checked against meta.json's counts and checksum."""
    tokens = self._open(split, "tokens").read().result()
    offsets = self._open(split, "offsets").read().result()
    want = self.meta["splits"][split]
    if len(tokens) != want["tokens"] or len(offsets) != want["documents"] + 1:
      raise UserError(f"{self.path}: {split} has {len(tokens)} tokens and {len(offsets) - 1} documents, "
                      f"meta.json says {want['tokens']} and {want['documents']}", _DAMAGED)
    if verify and crc32(tokens) != want["crc32"]:
      raise UserError(f"{self.path}: {split} tokens do not match their checksum in meta.json", _DAMAGED)
    return tokens, offsets


def is_store(path: str) -> bool:
  """Whether `path` looks like a token store (a URL, or a folder): not whether it is a valid one."""
  return is_url(path) or os.path.isdir(path)

