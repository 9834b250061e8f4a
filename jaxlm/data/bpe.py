"""Byte-level BPE tokenizer, stored as a Hugging Face `tokenizer.json`; same interface as ByteTokenizer.

Text is split into bytes, each byte shown as one printable character (the GPT-2 byte alphabet), and merges
are learned over those characters. There is no normalizer and no unknown token, so every string round-trips
exactly: leading and repeated spaces, tabs, "\\r\\n", emoji, combining marks, any script.

Special-token strings inside the text ("<|bos|>" typed by a user) are encoded as plain text, never as the
special ids: only `encode(..., bos=True)` and friends produce BOS/EOS.

Any other tokenizer.json loads too (`from_json`, `from_file`). A published one keeps its own ids for the four
roles where it has them by a known convention (`ROLE_TOKENS`: GPT-2's "<|endoftext|>" is its BOS and EOS,
Llama's "<s>" and "</s>"), and a role it lacks is played by its EOS, as `transformers` pads with EOS: its
vocabulary, and so the model's embedding of it, stays what it was (`jaxlm import`). A tokenizer with no known
EOS gets "<|bos|>", "<|eos|>", "<|pad|>" and "<|mask|>" added as new special tokens after its vocabulary.
Such a tokenizer round-trips only as well as its own design allows (a WordPiece tokenizer lowercases and has an
unknown token), and `token_bytes` is exact only for byte-level ones; decoding never raises.
"""

import json
import re
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxlm.errors import UserError, first_line

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>")
# Per role (BOS, EOS, PAD, MASK), the tokens of published tokenizers that play it, in order of preference.
ROLE_TOKENS = (("<|begin_of_text|>", "<s>", "<|endoftext|>"), ("<|end_of_text|>", "</s>", "<|endoftext|>"),
               ("<pad>",), ("<mask>",))
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
_BYTE_CHARS = frozenset(pre_tokenizers.ByteLevel.alphabet())
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")



def _uses_byte_level_decoder(spec: dict | None) -> bool:
  if not isinstance(spec, dict):
    return False
  if spec.get("type") == "ByteLevel":
    return True
  return any(_uses_byte_level_decoder(d) for d in spec.get("decoders") or [])


def _role_ids(tokenizer: Tokenizer) -> tuple[int, int, int, int]:
  """The ids of BOS, EOS, PAD and MASK: ours ("<|bos|>"...) where the vocabulary has them, else a published
  convention's, with EOS standing in for a role the tokenizer lacks; a tokenizer with no known EOS gets our
  four special tokens added (a no-op for those it already has as special)."""
  ours = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
  if None not in ours:
    return tuple(ours)
  found = [next((i for t in names if (i := tokenizer.token_to_id(t)) is not None), None) for names in ROLE_TOKENS]
  eos = ours[1] if ours[1] is not None else found[1]
  if eos is None:
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tuple(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
  return tuple(mine if mine is not None else theirs if theirs is not None else eos
               for mine, theirs in zip(ours, found))


class BPETokenizer:
  """A `tokenizers.Tokenizer` plus the ids of our four special tokens."""

  name = "bpe"

  def __init__(self, tokenizer: Tokenizer):
    tokenizer.encode_special_tokens = True  # "<|bos|>" in the text is text (not saved in the JSON)
    self._tok = tokenizer
    self.BOS, self.EOS, self.PAD, self.MASK = _role_ids(tokenizer)
    self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    self._token_bytes = self._count_token_bytes()

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
    """Learns merges until bytes + specials + merges make `vocab_size` tokens (fewer if merges run out)."""
    if vocab_size < MIN_VOCAB_SIZE:
      raise UserError(f"BPE vocab_size {vocab_size} is too small",
                      f"the 256 bytes and {len(SPECIAL_TOKENS)} special tokens need {MIN_VOCAB_SIZE} or more")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return cls(tokenizer)

  @classmethod
  def from_json(cls, text: str, source: str = "tokenizer.json") -> "BPETokenizer":
    """Loads a Hugging Face tokenizer.json (ours or any other); `source` names it in errors."""
    hint = "expected a Hugging Face tokenizer.json, e.g. one written by `BPETokenizer.to_json`"
    try:
      json.loads(text)
    except ValueError as e:
      raise UserError(f"tokenizer {source} is not valid JSON: {first_line(e)}", hint) from None
    try:
      tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for any malformed spec
      raise UserError(f"tokenizer {source} is not a Hugging Face tokenizer: {first_line(e)}", hint) from None
    return cls(tokenizer)

  @classmethod
  def from_file(cls, path: str) -> "BPETokenizer":
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise UserError(f"tokenizer {path} is not valid JSON: {first_line(e)}",
                      "expected a UTF-8 Hugging Face tokenizer.json") from None
    except OSError as e:
      raise UserError(f"cannot read tokenizer {path}: {e.strerror or e}",
                      "point at an existing Hugging Face tokenizer.json") from None
    return cls.from_json(text, source=path)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return np.array(([self.BOS] if bos else []) + ids + ([self.EOS] if eos else []), np.int32)

  def encode_batch(self, texts: list[str], *, eos: bool = False) -> list[np.ndarray]:
    """`encode` of each text (the same ids), in one call that the library spreads over the CPU's cores."""
    tail = [self.EOS] if eos else []
    return [np.array(e.ids + tail, np.int32) for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Special tokens and out-of-range ids are dropped; a cut multibyte character becomes U+FFFD."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.vocab_size]
    try:
      return self._tok.decode(ids, skip_special_tokens=True)
    except Exception:  # noqa: BLE001 - a foreign decoder failing on odd input: use the raw token strings
      special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
      tokens = (self._tok.id_to_token(i) for i in ids)
      return "".join(t for t in tokens if t is not None and t not in special)

  def token_bytes(self) -> np.ndarray:
    """Bytes of text each token stands for (0 for specials): turns nats per token into bits per byte."""
    return self._token_bytes.copy()

  def to_json(self) -> str:
    """The Hugging Face tokenizer.json, loadable with `tokenizers.Tokenizer.from_file`."""
    return self._tok.to_str(pretty=True) + "\n"

  def __getstate__(self) -> dict:
    return {"json": self._tok.to_str()}

  def __setstate__(self, state: dict) -> None:  # a pickled Tokenizer would forget encode_special_tokens
    self.__init__(Tokenizer.from_str(state["json"]))

  def _count_token_bytes(self) -> np.ndarray:
    spec = json.loads(self._tok.to_str())
    byte_level = _uses_byte_level_decoder(spec.get("decoder"))
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    added = self._tok.get_added_tokens_decoder()
    lengths = np.zeros(self.vocab_size, np.int32)
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if i in added:  # matched verbatim in the text, or special (stands for no text)
        lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
      elif byte_level and all(c in _BYTE_CHARS for c in token):
        lengths[i] = len(token)  # one character per byte
      elif byte_fallback and _BYTE_FALLBACK.fullmatch(token):
        lengths[i] = 1
      else:  # best effort for other designs (WordPiece, Metaspace, ...)
        try:
          lengths[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        except Exception:  # noqa: BLE001 - any failure: count the raw token string
          lengths[i] = len(token.encode("utf-8"))
    return lengths
