"""Byte-level tokenizer: the 256 byte values, then BOS, EOS, PAD and MASK.

Every string round-trips, in every language, with no vocabulary file. Decoding never fails: special
tokens are dropped and a partial UTF-8 sequence (e.g. a sample cut mid-character) becomes U+FFFD.
"""

import json

import numpy as np

from jaxlm.errors import UserError

VOCAB_MULTIPLE = 128  # the model's vocabulary is padded to this so the `vocab` axis shards evenly


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
  return -(-vocab_size // multiple) * multiple


class ByteTokenizer:
  """Token i < 256 is byte i; the special tokens follow."""

  name = "byte"
  BOS, EOS, PAD, MASK = 256, 257, 258, 259
  vocab_size = 260

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    parts = ([np.array([self.BOS], np.int32)] if bos else []) + [ids]
    parts += [np.array([self.EOS], np.int32)] if eos else []
    return np.concatenate(parts)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    """Bytes of text each token stands for (0 for specials): turns nats per token into bits per byte."""
    lengths = np.zeros(self.vocab_size, np.int32)
    lengths[:256] = 1
    return lengths

  def to_json(self) -> str:
    return json.dumps({"type": self.name, "vocab_size": self.vocab_size}, indent=2) + "\n"


def save_tokenizer(tokenizer, path: str) -> None:
  """Writes the tokenizer as JSON (atomically), so a workdir alone can decode and encode."""
  from jaxlm import files

  files.write_text(path, tokenizer.to_json())


def load_tokenizer_json(text: str, source: str = "tokenizer.json"):
  """Our byte tokenizer ({"type": "byte"}) or a Hugging Face tokenizer.json (BPE)."""
  try:
    spec = json.loads(text)
  except ValueError:
    raise UserError(f"{source} is not valid JSON", "give a tokenizer.json file") from None
  if isinstance(spec, dict) and spec.get("type") == ByteTokenizer.name:
    return ByteTokenizer()
  from jaxlm.data.bpe import BPETokenizer  # the tokenizers library only when needed

  return BPETokenizer.from_json(text, source)
