"""`jaxlm prepare --pairs`: fine-tuning examples -> a token store with loss weights, and clear refusals."""

import gzip
import itertools
import json
import shutil

import numpy as np
import pytest

from jaxlm import cli
from jaxlm.data import store
from jaxlm.data.bpe import BPETokenizer
from jaxlm.data.prepare import prepare
from jaxlm.data.tokenizer import load_tokenizer_json
from jaxlm.errors import UserError

DAMAGED = "the store is damaged; prepare it again with --overwrite"
PROMPTS = ["What is a fox?", "Übersetze: Grüße", "", "昔々、あるところに", "Say 🦊\n twice", "Count: 1 2 3"]
RESPONSES = ["An animal.", "Greetings 👋", "(an empty prompt is allowed)", "おじいさんと🍑", "🦊🦊", "4 5 6\n"]


def example(n: int) -> dict:
  return {"prompt": PROMPTS[n % len(PROMPTS)] + (f" #{n}" if n % len(PROMPTS) != 2 else ""),
          "response": RESPONSES[n % len(RESPONSES)] + f" ({n})", "id": n}


def write_jsonl(path, examples, ensure_ascii=False) -> str:
  text = "".join(json.dumps(e, ensure_ascii=ensure_ascii) + "\n" for e in examples)
  if str(path).endswith(".gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A folder of 60 examples: 40 in a.jsonl (\\u escapes, blank lines), 20 in b.jsonl.gz."""
  root = tmp_path_factory.mktemp("pairs")
  examples = [example(n) for n in range(60)]
  write_jsonl(root / "a.jsonl", examples[:40], ensure_ascii=True)
  with open(root / "a.jsonl", "a") as f:
    f.write("\n  \n")
  write_jsonl(root / "b.jsonl.gz", examples[40:])
  return root, examples


def split_of(n: int, val_fraction: float, seed: int = 0) -> str:
  """Where example n goes, as for any document: decided by (seed, n) alone."""
  return "validation" if np.random.default_rng([seed, n]).random() < val_fraction else "train"


def stored_examples(path) -> dict:
  """split -> [(tokens, weights)] of each stored example, read through TokenStore (checksums verified)."""
  token_store = store.TokenStore(str(path))
  out = {}
  for split in store.SPLITS:
    tokens, offsets = token_store.read(split)
    weights = token_store.read_weights(split)
    out[split] = [(tokens[a:b], weights[a:b]) for a, b in itertools.pairwise(offsets)]
  return out


def expected(tokenizer, e: dict) -> tuple[np.ndarray, np.ndarray]:
  prompt, response = tokenizer.encode(e["prompt"]), tokenizer.encode(e["response"])
  tokens = np.concatenate([prompt, response, [tokenizer.EOS]])
  return tokens, np.array([0] * len(prompt) + [1] * (len(response) + 1), np.uint8)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_each_example_is_its_prompt_its_response_and_eos_with_loss_on_the_response(folder, tmp_path, tokenizer):
  root, examples = folder
  prepare([str(root)], str(tmp_path / "s"), tokenizer=tokenizer, pairs=("prompt", "response"), val_fraction=0.2,
          progress=False)
  tok = load_tokenizer_json(store.TokenStore(str(tmp_path / "s")).tokenizer_json)
  stored = stored_examples(tmp_path / "s")
  for split in store.SPLITS:
    want = [expected(tok, e) for n, e in enumerate(examples) if split_of(n, 0.2) == split]
    assert len(stored[split]) == len(want) > 0
    for (tokens, weights), (want_tokens, want_weights) in zip(stored[split], want):
      assert np.array_equal(tokens, want_tokens) and np.array_equal(weights, want_weights)
      assert weights.dtype == np.uint8


def test_units_buffer_and_workers_do_not_change_a_pairs_store(folder, tmp_path):
  root, _ = folder
  whole = prepare([str(root)], str(tmp_path / "whole"), pairs=("prompt", "response"), val_fraction=0.2,
                  progress=False)
  pieces = prepare([str(root)], str(tmp_path / "pieces"), pairs=("prompt", "response"), val_fraction=0.2,
                   unit_bytes=50, buffer_chunks=1, workers=2, progress=False)  # ~25 units, 2 processes
  assert whole["splits"] == pieces["splits"]  # counts and checksums of tokens and weights
  for split, examples in stored_examples(tmp_path / "whole").items():
    other = stored_examples(tmp_path / "pieces")[split]
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(examples, other))


def test_meta_names_the_fields_and_counts_and_checksums_the_weights(folder, tmp_path):
  root, examples = folder
  meta = prepare([str(root)], str(tmp_path / "s"), pairs=("prompt", "response"), val_fraction=0.2, progress=False)
  token_store = store.TokenStore(str(tmp_path / "s"))
  assert meta["pairs"] == token_store.meta["pairs"] == ["prompt", "response"]
  assert token_store.pairs == ("prompt", "response")
  assert meta["split_by"] == "document" and meta["sources"]["files"] == 2
  assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == len(examples)
  for split in store.SPLITS:
    weights = token_store.read_weights(split)
    counts = meta["splits"][split]
    assert counts["weights_crc32"] == store.crc32(weights) and counts["weighted_tokens"] == int(weights.sum())
    assert len(weights) == counts["tokens"] and 0 < counts["weighted_tokens"] < counts["tokens"]
    handle = token_store.weights(split)
    assert handle.dtype.numpy_dtype == np.uint8 and handle.shape == (counts["tokens"],)


def test_an_ordinary_store_has_no_pairs_and_no_weights(folder, tmp_path):
  root, _ = folder
  (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
  meta = prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "s"), val_fraction=0.5, progress=False)
  assert "pairs" not in meta and meta["sources"]["text_field"] == "text"
  assert all(set(counts) == {"documents", "tokens", "crc32"} for counts in meta["splits"].values())
  assert not list((tmp_path / "s").glob("*/weights"))
  token_store = store.TokenStore(str(tmp_path / "s"))
  assert token_store.pairs is None
  with pytest.raises(UserError, match="not a store of fine-tuning pairs"):
    token_store.read_weights("train")


def test_bpe_for_pairs_trains_on_prompts_and_responses(folder, tmp_path, monkeypatch):
  root, examples = folder
  seen, train = [], BPETokenizer.train.__func__

  def recording(cls, texts, vocab_size):
    return train(cls, (seen.append(t) or t for t in texts), vocab_size)
  monkeypatch.setattr(BPETokenizer, "train", classmethod(recording))
  prepare([str(root)], str(tmp_path / "s"), tokenizer="bpe:300", pairs=("prompt", "response"), progress=False)
  assert seen == [text for e in examples for text in (e["prompt"], e["response"])]


@pytest.mark.parametrize("val_fraction, empty, moved_to", [(0.01, "validation", "validation"),
                                                            (0.99, "train", "train")])
def test_an_empty_split_gets_the_other_splits_last_example_whole(tmp_path, val_fraction, empty, moved_to):
  examples = [example(n) for n in range(5)]
  assert all(split_of(n, val_fraction) != empty for n in range(5))  # (so the split would be empty)
  write_jsonl(tmp_path / "p.jsonl", examples)
  meta = prepare([str(tmp_path / "p.jsonl")], str(tmp_path / "s"), pairs=("prompt", "response"),
                 val_fraction=val_fraction, progress=False)
  stored = stored_examples(tmp_path / "s")  # (checks every count and checksum)
  other = "train" if moved_to == "validation" else "validation"
  tok = load_tokenizer_json(store.TokenStore(str(tmp_path / "s")).tokenizer_json)
  assert [[t.tolist(), w.tolist()] for t, w in stored[moved_to]] == [
      [a.tolist() for a in expected(tok, examples[4])]]
  assert [t.tolist() for t, _ in stored[other]] == [expected(tok, e)[0].tolist() for e in examples[:4]]
  assert meta["split_by"] == "document"
  assert meta["splits"][moved_to]["weighted_tokens"] == len(tok.encode(examples[4]["response"])) + 1


def test_two_examples_are_enough(tmp_path):
  write_jsonl(tmp_path / "p.jsonl", [example(0), example(1)])
  meta = prepare([str(tmp_path / "p.jsonl")], str(tmp_path / "s"), pairs=("prompt", "response"), progress=False)
  assert meta["splits"]["train"]["documents"] == meta["splits"]["validation"]["documents"] == 1


def test_the_command_reports_the_loss_tokens(folder, tmp_path, capsys):
  root, _ = folder
  capsys.readouterr()
  assert cli.main(["prepare", f"--input={root}", f"--output={tmp_path / 's'}", "--pairs"]) == 0
  train = store.TokenStore(str(tmp_path / "s")).meta["splits"]["train"]
  out = capsys.readouterr().out
  assert "60 documents" in out and "split by document" in out
  assert (f"; pairs prompt,response: loss on {train['weighted_tokens']:,} of {train['tokens']:,} training tokens"
          in out), out


@pytest.mark.parametrize("flags", [["--pairs", "--val_fraction=0.5"], ["--pairs=q,a"], ["--pairs", "q,a"]])
def test_pairs_names_the_fields_and_a_bare_pairs_means_prompt_and_response(tmp_path, capsys, flags):
  fields = ("q", "a") if "q,a" in flags[-1] else ("prompt", "response")
  write_jsonl(tmp_path / "p.jsonl", [{fields[0]: "hi", fields[1]: "ho"}, {fields[0]: "", fields[1]: "hey"}])
  assert cli.main(["prepare", *flags, f"--input={tmp_path / 'p.jsonl'}", f"--output={tmp_path / 's'}"]) == 0
  assert store.TokenStore(str(tmp_path / "s")).pairs == fields


def test_help_lists_pairs(capsys):
  assert cli.main(["prepare", "--help"]) == 0
  line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  --pairs="))
  assert "PROMPT,RESPONSE" in line and "prompt,response" in line


BAD_LINES = [
    ('{"prompt": "p"}', "p.jsonl:2: no field 'response'"),
    ('{"response": "r"}', "p.jsonl:2: no field 'prompt'"),
    ('{"prompt": 3, "response": "r"}', "p.jsonl:2: field 'prompt' is a number, not a string"),
    ('{"prompt": "p", "response": null}', "p.jsonl:2: field 'response' is null, not a string"),
    ('{"prompt": "p", "response": ["r"]}', "p.jsonl:2: field 'response' is an array, not a string"),
    ('{"prompt": {}, "response": "r"}', "p.jsonl:2: field 'prompt' is an object, not a string"),
    ('{"prompt": "p", "response": true}', "p.jsonl:2: field 'response' is a boolean, not a string"),
    ('{"prompt": "p", "response": ""}', "p.jsonl:2: field 'response' is empty"),
    ('["p", "r"]', "p.jsonl:2: an array, not an object with fields 'prompt' and 'response'"),
    ('{"prompt": "p", "response": ', "p.jsonl:2: not valid JSON"),
]


def one_line_error(capsys, argv, tmp_path) -> str:
  capsys.readouterr()
  assert cli.main(["prepare", *argv, f"--output={tmp_path / 's'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("jaxlm: error: ") and err.endswith(")"), err
  assert not (tmp_path / "s").exists() and not list(tmp_path.glob("s.partial-*"))  # nothing left behind
  return err


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_example_is_a_one_line_error_naming_file_and_line(tmp_path, capsys, line, message):
  (tmp_path / "p.jsonl").write_text(json.dumps(example(0)) + "\n" + line + "\n" + json.dumps(example(1)) + "\n",
                                    encoding="utf-8")
  err = one_line_error(capsys, [f"--input={tmp_path / 'p.jsonl'}", "--pairs"], tmp_path)
  assert message in err, err


def test_bad_utf8_and_surrogates_are_replaced_or_refused_as_for_text(tmp_path, capsys):
  good = json.dumps(example(0)).encode() + b"\n"
  (tmp_path / "p.jsonl").write_bytes(good + b'{"prompt": "a\xffb", "response": "\\ud800!"}\n')
  argv = [f"--input={tmp_path / 'p.jsonl'}", "--pairs"]
  err = one_line_error(capsys, [*argv, "--strict_utf8"], tmp_path)
  assert f"p.jsonl: invalid UTF-8 at byte {len(good) + 13}" in err, err
  (tmp_path / "p.jsonl").write_bytes(good + b'{"prompt": "ab", "response": "\\ud800!"}\n')
  err = one_line_error(capsys, [*argv, "--strict_utf8"], tmp_path)
  assert "p.jsonl:2: JSON string has an unpaired surrogate escape" in err, err
  (tmp_path / "p.jsonl").write_bytes(good + b'{"prompt": "a\xffb", "response": "\\ud800!"}\n')
  assert cli.main(["prepare", *argv, f"--output={tmp_path / 's'}", "--val_fraction=0.5"]) == 0
  assert "2 invalid UTF-8 sequences replaced" in capsys.readouterr().out
  tok = load_tokenizer_json(store.TokenStore(str(tmp_path / "s")).tokenizer_json)
  texts = [tok.decode(t[w == 0]) + "|" + tok.decode(t[w == 1]) for split in stored_examples(tmp_path / "s").values()
           for t, w in split]
  assert "a\ufffdb|\ufffd!" in texts


@pytest.mark.parametrize("flags, message", [
    (["--pairs=prompt"], "--pairs=prompt is not two different field names"),
    (["--pairs=a,b,c"], "--pairs=a,b,c is not two different field names"),
    (["--pairs=a,a"], "--pairs=a,a is not two different field names"),
    (["--pairs=a,"], "--pairs=a, is not two different field names"),
    (["--pairs="], "--pairs= is not two different field names"),
    (["--pairs", "--text_field=body"], "--pairs and --text_field=body do not go together"),
])
def test_bad_pairs_flags_are_one_line_errors(folder, tmp_path, capsys, flags, message):
  root, _ = folder
  err = one_line_error(capsys, [f"--input={root}", *flags], tmp_path)
  assert message in err, err


def test_text_files_cannot_give_pairs(folder, tmp_path, capsys):
  root, _ = folder
  (tmp_path / "in").mkdir()
  shutil.copy(root / "a.jsonl", tmp_path / "in" / "a.jsonl")
  (tmp_path / "in" / "notes.txt").write_text("no fields here", encoding="utf-8")
  err = one_line_error(capsys, [f"--input={tmp_path / 'in'}", "--pairs"], tmp_path)
  assert f"{tmp_path / 'in' / 'notes.txt'} is not a .jsonl file" in err and "--pairs" in err, err


@pytest.mark.parametrize("examples", [0, 1])
def test_fewer_than_two_examples_is_a_one_line_error(tmp_path, capsys, examples):
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(example(n)) + "\n" for n in range(examples)) + "\n",
                                    encoding="utf-8")
  err = one_line_error(capsys, [f"--input={tmp_path / 'p.jsonl'}", "--pairs"], tmp_path)
  assert f"--pairs needs at least 2 examples, and {tmp_path / 'p.jsonl'} has {examples}" in err, err


@pytest.fixture
def pairs_store(folder, tmp_path):
  root, _ = folder
  prepare([str(root)], str(tmp_path / "s"), pairs=("prompt", "response"), val_fraction=0.2, progress=False)
  return store.TokenStore(str(tmp_path / "s"))


def test_changed_weights_fail_their_checksum(pairs_store):
  weights = pairs_store.weights("train")
  weights[3:4].write(np.array([1 - int(weights[3].read().result())], np.uint8)).result()
  with pytest.raises(UserError, match="train weights do not match their checksum") as e:
    pairs_store.read_weights("train")
  assert e.value.hint == DAMAGED
  assert len(pairs_store.read_weights("train", verify=False)) == pairs_store.meta["splits"]["train"]["tokens"]


def test_missing_weights_are_damage(pairs_store, tmp_path):
  shutil.rmtree(tmp_path / "s" / "validation" / "weights")
  for read in (pairs_store.read_weights, pairs_store.weights):
    with pytest.raises(UserError, match="cannot open validation/weights") as e:
      read("validation")
    assert e.value.hint == DAMAGED


def test_weights_of_the_wrong_length_are_damage(pairs_store, tmp_path):
  store.write_array(str(tmp_path / "s"), "train/weights", np.ones(3, np.uint8))
  with pytest.raises(UserError, match="train has 3 weights, meta.json says") as e:
    pairs_store.read_weights("train")
  assert e.value.hint == DAMAGED
