"""jaxlm's byte tokenizer (data/tokenizer.py) as a Hugging Face tokenizer.json: the same ids for every text.

Byte b is token b, written as GPT-2's printable character for that byte (the ByteLevel alphabet), in a BPE
model with no merges, so each byte stays its own token; "<|bos|>", "<|eos|>", "<|pad|>" and "<|mask|>" are
the special tokens 256..259, as in ByteTokenizer.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxlm.data.bpe import SPECIAL_TOKENS


def byte_characters() -> list[str]:
  """The character GPT-2's byte-level pre-tokenizer shows byte b as, for b in 0..255: the printable Latin-1
  bytes as themselves, the others as the characters from U+0100 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  shown, extra = {}, 0
  for b in range(256):
    if b in printable:
      shown[b] = chr(b)
    else:
      shown[b] = chr(256 + extra)
      extra += 1
  return [shown[b] for b in range(256)]


def byte_tokenizer_json() -> str:
  vocab = {c: b for b, c in enumerate(byte_characters())}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  return tokenizer.to_str(pretty=True) + "\n"
