import json
import pickle

import numpy as np
import pytest
import tokenizers as hf

from jaxlm.data.bpe import SPECIAL_TOKENS, BPETokenizer
from jaxlm.errors import UserError

MULTILINGUAL = [
  "The quick brown fox jumps over the lazy dog. It's 42 degrees; isn't it?",
  "Grüße aus Köln! Die Bäume blühen, Straße, Größe, Übermut.",
  "Voilà, un café crème à côté de l'église; où est le garçon? Noël, œuvre.",
  "Привет, мир! Съешь же ещё этих мягких французских булок.",
  "Γειά σου Κόσμε. Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
  "مرحبا بالعالم. هذا نص عربي قصير.",
  "नमस्ते दुनिया। यह एक छोटा हिंदी वाक्य है।",
  "你好，世界！这是一个简短的中文句子。",
  "こんにちは世界。日本語のテキストです。カタカナ、ひらがな。",
  "안녕하세요 세계. 한국어 문장입니다.",
  "emoji 😀🎉🚀 dev 👩‍💻 family 👨‍👩‍👧‍👦 thumbs 👍🏽👋🏿 flags 🇯🇵🇩🇪🇺🇦",
  "\ttabs\tand\t\ttabs\nwindows\r\nlines\r\n\r\nend",
  "   leading spaces, trailing spaces   ",
  "multiple     spaces  and\n\n\nblank lines\n",
  "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0324\u0316 and ligature ﬁ, nbsp\u00a0here",
]
CORPUS = "\n".join(MULTILINGUAL * 4)

UNSEEN = [
  "",
  " ",
  "\n",
  "\r\n",
  "  x  ",
  "\t\t\t",
  "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
  "Θέλει αρετή και τόλμη η ελευθερία. Ελλάδα ελλάδα",
  "ქართული ენა და ჰაიერენ: Հայերեն լեզու",
  "עברית מימין לשמאל, ไทย ภาษา, Tiếng Việt có dấu",
  "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 ∮ E⋅da = Q,  n → ∞, ∑ f(i) = ∏ g(i)",
  "unseen emoji 🦜🧬🪐 🧑🏾‍🚀 🏳️‍🌈 🇧🇷 ❤️‍🔥",
  "控制字符 \x00\x01\x7f and a lone BOM \ufeff and U+FFFD \ufffd",
  "typed specials stay text: <|bos|> <|eos|><|pad|><|mask|>",
  "e\u0301\u0301\u0301 Ả\u0300 ḁ̷̛ \u200b zero\u200dwidth",
  "mixed\r\n\ttabs  \r  \n\n  spaces and trailing   ",
]

ENGLISH = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
           "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, "
           "it was the season of Light, it was the season of Darkness, it was the spring of hope, "
           "it was the winter of despair.\n") * 60


@pytest.fixture(scope="module")
def tok():
  return BPETokenizer.train([CORPUS], vocab_size=600)


def foreign_tokenizer_json() -> str:
  """A GPT-2-style byte-level tokenizer.json made by someone else: no special tokens of ours."""
  t = hf.Tokenizer(hf.models.BPE())
  t.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  t.train_from_iterator([ENGLISH[:2000]], trainer)
  return t.to_str()


def wordpiece_tokenizer_json() -> str:
  vocab = {"[UNK]": 0, "the": 1, "##s": 2, "a": 3, "##b": 4}
  t = hf.Tokenizer(hf.models.WordPiece(vocab, unk_token="[UNK]"))
  t.normalizer = hf.normalizers.BertNormalizer(lowercase=True)
  t.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
  t.decoder = hf.decoders.WordPiece()
  return t.to_str()


@pytest.mark.parametrize("text", MULTILINGUAL + [CORPUS])
def test_text_seen_in_training_round_trips_exactly(tok, text):
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", UNSEEN)
def test_unseen_text_round_trips_exactly(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_encode_returns_int32_ids_within_the_vocabulary(tok):
  ids = tok.encode(CORPUS)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert 0 <= ids.min() and ids.max() < tok.vocab_size
  assert tok.encode("").dtype == np.int32 and tok.encode("").shape == (0,)


def test_vocabulary_has_the_requested_size_and_the_special_tokens():
  tok = BPETokenizer.train([ENGLISH], vocab_size=300)
  assert tok.name == "bpe" and tok.vocab_size == 300
  assert tok.token_bytes().shape == (300,)


def test_bpe_compresses_repetitive_english():
  tok = BPETokenizer.train([ENGLISH], vocab_size=1000)
  ids = tok.encode(ENGLISH)
  assert len(ids) / len(ENGLISH.encode("utf-8")) < 0.6
  assert tok.decode(ids) == ENGLISH


def test_multilingual_text_compresses_too(tok):
  assert len(tok.encode(CORPUS)) / len(CORPUS.encode("utf-8")) < 0.6


def test_bos_and_eos_placement_and_distinct_special_ids(tok):
  specials = [tok.BOS, tok.EOS, tok.PAD, tok.MASK]
  assert len(set(specials)) == 4 and all(0 <= s < tok.vocab_size for s in specials)
  assert all(isinstance(s, int) for s in specials)
  plain = tok.encode("héllo 👋")
  both = tok.encode("héllo 👋", bos=True, eos=True)
  assert both.tolist() == [tok.BOS] + plain.tolist() + [tok.EOS]
  assert tok.encode("x", bos=True).tolist() == [tok.BOS] + tok.encode("x").tolist()
  assert tok.encode("x", eos=True).tolist() == tok.encode("x").tolist() + [tok.EOS]
  assert tok.encode("", bos=True, eos=True).tolist() == [tok.BOS, tok.EOS]


def test_decode_drops_special_tokens(tok):
  ids = [tok.BOS, *tok.encode("a b"), tok.PAD, tok.MASK, *tok.encode(" c"), tok.EOS, tok.PAD]
  assert tok.decode(ids) == "a b c"
  assert tok.decode(np.array([tok.BOS, tok.EOS, tok.PAD, tok.MASK])) == ""


def test_special_token_strings_in_text_are_encoded_as_text(tok):
  ids = tok.encode("<|bos|>x<|eos|>")
  assert not set(ids.tolist()) & {tok.BOS, tok.EOS, tok.PAD, tok.MASK}
  assert tok.decode(ids) == "<|bos|>x<|eos|>"


def test_decode_skips_out_of_range_ids_and_never_raises(tok):
  a, b = tok.encode("a").tolist(), tok.encode("b").tolist()
  assert tok.decode(a + [-1, tok.vocab_size, 10**9] + b) == "ab"
  for i in range(tok.vocab_size):
    assert isinstance(tok.decode([i]), str)
  rng = np.random.default_rng(0)
  for _ in range(50):
    assert isinstance(tok.decode(rng.integers(-5, tok.vocab_size + 5, size=20)), str)


def test_decoding_a_cut_multibyte_character_gives_a_replacement_character(tok):
  ids = tok.encode("ok 🦜")  # unseen in training: the emoji is several byte tokens
  cut = tok.decode(ids[:-1])
  assert cut.startswith("ok") and cut.endswith("\ufffd")


@pytest.mark.parametrize("text", MULTILINGUAL + UNSEEN + [CORPUS, ENGLISH])
def test_token_bytes_sum_to_the_utf8_length(tok, text):
  lengths = tok.token_bytes()
  assert int(lengths[tok.encode(text, bos=True, eos=True)].sum()) == len(text.encode("utf-8"))


def test_token_bytes_are_zero_only_for_specials(tok):
  lengths = tok.token_bytes()
  assert lengths.dtype == np.int32 and lengths.shape == (tok.vocab_size,)
  specials = [tok.BOS, tok.EOS, tok.PAD, tok.MASK]
  assert lengths[specials].tolist() == [0, 0, 0, 0]
  assert np.count_nonzero(lengths) == tok.vocab_size - 4
  assert lengths.max() > 1


def test_training_is_deterministic():
  a = BPETokenizer.train([CORPUS], vocab_size=500)
  b = BPETokenizer.train([CORPUS], vocab_size=500)
  assert a.to_json() == b.to_json()


def test_training_accepts_any_iterable_of_texts():
  gen = BPETokenizer.train((line for line in MULTILINGUAL), vocab_size=400)
  listed = BPETokenizer.train(list(MULTILINGUAL), vocab_size=400)
  assert gen.to_json() == listed.to_json()


def test_json_and_file_round_trip_give_identical_encodings(tok, tmp_path):
  text = tok.to_json()
  assert json.loads(text)["model"]["type"] == "BPE"
  again = BPETokenizer.from_json(text)
  path = tmp_path / "tokenizer.json"
  path.write_text(text, encoding="utf-8")
  loaded = BPETokenizer.from_file(str(path))
  for other in (again, loaded):
    assert other.to_json() == text
    assert (other.vocab_size, other.BOS, other.EOS, other.PAD, other.MASK) == (
      tok.vocab_size, tok.BOS, tok.EOS, tok.PAD, tok.MASK)
    assert other.token_bytes().tolist() == tok.token_bytes().tolist()
    for t in MULTILINGUAL + UNSEEN:
      assert other.encode(t, bos=True, eos=True).tolist() == tok.encode(t, bos=True, eos=True).tolist()


def test_pickled_copy_encodes_identically(tok):  # data preparation sends it to spawned workers
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.to_json() == tok.to_json() and copy.token_bytes().tolist() == tok.token_bytes().tolist()
  for t in MULTILINGUAL + UNSEEN:
    assert copy.encode(t, bos=True).tolist() == tok.encode(t, bos=True).tolist()


def test_json_is_a_plain_hugging_face_tokenizer(tok, tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text(tok.to_json(), encoding="utf-8")
  plain = hf.Tokenizer.from_file(str(path))
  text = MULTILINGUAL[10]
  assert plain.encode(text).ids == tok.encode(text).tolist()
  assert plain.decode(plain.encode(text).ids) == text
  assert [plain.token_to_id(t) for t in SPECIAL_TOKENS] == [tok.BOS, tok.EOS, tok.PAD, tok.MASK]


def test_a_published_tokenizer_keeps_its_vocabulary_and_its_end_token_plays_the_missing_roles(tmp_path):
  original = hf.Tokenizer.from_str(foreign_tokenizer_json())
  assert all(original.token_to_id(t) is None for t in SPECIAL_TOKENS)
  path = tmp_path / "tokenizer.json"
  path.write_text(foreign_tokenizer_json(), encoding="utf-8")
  tok = BPETokenizer.from_file(str(path))
  # GPT-2's convention: one <|endoftext|> is BOS and EOS; PAD and MASK fall back to it (no ids are added,
  # so an imported model's embedding of this vocabulary still covers every id).
  end = original.token_to_id("<|endoftext|>")
  assert [tok.BOS, tok.EOS, tok.PAD, tok.MASK] == [end] * 4
  assert tok.vocab_size == original.get_vocab_size() and tok.to_json().strip() == original.to_str(pretty=True)
  text = "It was the age of 👩‍💻, <|endoftext|> Grüße"
  plain = "It was the age of 👩‍💻, Grüße"
  assert tok.encode(plain).tolist() == original.encode(plain).ids
  assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_a_tokenizer_without_a_known_end_token_gets_our_special_tokens_added():
  original = hf.Tokenizer.from_str(wordpiece_tokenizer_json())
  tok = BPETokenizer.from_json(wordpiece_tokenizer_json())
  assert [tok.BOS, tok.EOS, tok.PAD, tok.MASK] == list(range(original.get_vocab_size(), tok.vocab_size))
  assert tok.vocab_size == original.get_vocab_size() + 4


def test_llama_style_special_tokens_are_bos_and_eos():
  t = hf.Tokenizer(hf.models.BPE())
  t.add_special_tokens(["<unk>", "<s>", "</s>"])
  tok = BPETokenizer(t)
  assert (tok.BOS, tok.EOS, tok.PAD, tok.MASK, tok.vocab_size) == (1, 2, 2, 2, 3)


def test_a_wordpiece_tokenizer_loads_and_decode_never_raises():
  tok = BPETokenizer.from_json(wordpiece_tokenizer_json(), source="bert.json")
  assert tok.vocab_size == 9 and [tok.BOS, tok.EOS, tok.PAD, tok.MASK] == [5, 6, 7, 8]
  assert tok.decode(tok.encode("The ab", bos=True)) == "the ab"
  assert tok.encode("ünknown").tolist() == [0]
  for ids in ([], [0], list(range(-2, 12)), [4, 4, 2, 1]):
    assert isinstance(tok.decode(ids), str)


def test_vocab_size_below_bytes_plus_specials_is_a_user_error():
  with pytest.raises(UserError, match="259"):
    BPETokenizer.train([ENGLISH], vocab_size=259)
  assert BPETokenizer.train([ENGLISH], vocab_size=260).vocab_size == 260


def test_missing_file_is_a_user_error_naming_it(tmp_path):
  path = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(UserError) as e:
    BPETokenizer.from_file(path)
  assert path in str(e.value) and "\n" not in str(e.value) and e.value.hint


def test_file_that_is_not_json_is_a_user_error_naming_it(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text("this is { not json", encoding="utf-8")
  with pytest.raises(UserError, match="not valid JSON") as e:
    BPETokenizer.from_file(str(path))
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  path.write_bytes(b"\xff\xfe\x00garbage")
  with pytest.raises(UserError, match="not valid JSON") as e:
    BPETokenizer.from_file(str(path))
  assert str(path) in str(e.value)


@pytest.mark.parametrize("text", ['{"hello": 1}', "[1, 2, 3]", '{"model": {"type": "Nonsense"}}', "null"])
def test_json_that_is_not_a_tokenizer_is_a_user_error_naming_it(tmp_path, text):
  path = tmp_path / "config.json"
  path.write_text(text, encoding="utf-8")
  with pytest.raises(UserError, match="not a Hugging Face tokenizer") as e:
    BPETokenizer.from_file(str(path))
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(UserError, match="from-a-string"):
    BPETokenizer.from_json(text, source="from-a-string")
