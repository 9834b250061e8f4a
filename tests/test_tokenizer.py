import numpy as np

from jaxlm.data.tokenizer import ByteTokenizer, padded_vocab_size

TEXT = "Hello, world! Grüße aus Köln. Привет, мир. 日本語のテキスト. مرحبا 👋🏽🧪 done."


def test_multilingual_text_with_emoji_round_trips():
  tok = ByteTokenizer()
  assert tok.decode(tok.encode(TEXT)) == TEXT


def test_special_tokens_are_outside_the_bytes_and_dropped_when_decoding():
  tok = ByteTokenizer()
  ids = tok.encode("abc", bos=True, eos=True)
  assert ids[0] == tok.BOS and ids[-1] == tok.EOS
  assert len({tok.BOS, tok.EOS, tok.PAD, tok.MASK}) == 4 and min(tok.BOS, tok.EOS, tok.PAD, tok.MASK) >= 256
  assert tok.decode(np.append(ids, tok.PAD)) == "abc"


def test_decoding_a_cut_multibyte_character_does_not_fail():
  tok = ByteTokenizer()
  ids = tok.encode("ok 👋")[:-2]  # the emoji's 4 bytes, cut in half
  assert tok.decode(ids) == "ok \ufffd"


def test_vocabulary_is_padded_to_a_multiple_of_128():
  assert padded_vocab_size(ByteTokenizer().vocab_size) == 384
  assert padded_vocab_size(256) == 256 and padded_vocab_size(257) == 384


def test_token_bytes_count_one_byte_per_byte_token_and_none_for_specials():
  lengths = ByteTokenizer().token_bytes()
  assert lengths[:256].tolist() == [1] * 256 and lengths[256:].tolist() == [0] * 4
