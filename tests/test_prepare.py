"""`jaxlm prepare`: text -> token store -> training, with exact round trips and clear refusals."""

import gzip
import json
import os

import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import cli, loop
from jaxlm.data import store
from jaxlm.data.prepare import prepare
from jaxlm.data.tokenizer import load_tokenizer_json
from jaxlm.errors import UserError

TEXTS = ["Once upon a time, a fox 🦊 met a crow.", "Es war einmal — Grüße aus Köln.",
         "Il était une fois… «café» à Paris.", "Жили-были дед да баба.", "昔々、あるところに🍑。",
         "옛날 옛적에 👩‍💻 호랑이가 살았어요.", "Σε μια χώρα μακρινή.", "  leading spaces\tand tabs\r\n"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A folder: 2 text files and a gzipped JSONL of many short documents."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "a.txt").write_text(TEXTS[0] * 20, encoding="utf-8")
  (root / "sub").mkdir()
  (root / "sub" / "b.txt").write_text(TEXTS[1] * 20, encoding="utf-8")
  lines = [json.dumps({"text": TEXTS[i % len(TEXTS)] + f" #{i}", "id": i}) for i in range(300)]
  with gzip.open(root / "sub" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  documents = [TEXTS[0] * 20, TEXTS[1] * 20] + [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(300)]
  return root, documents


def decoded_documents(path):
  token_store = store.TokenStore(str(path))
  tokenizer = load_tokenizer_json(token_store.tokenizer_json)
  out = {}
  for split in store.SPLITS:
    tokens, offsets = token_store.read(split)
    docs = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert all(d[-1] == tokenizer.EOS for d in docs), "every document ends with EOS"
    out[split] = [tokenizer.decode(d) for d in docs]
  return token_store, out


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_documents_round_trip_and_split_by_document(corpus, tmp_path, tokenizer):
  root, documents = corpus
  meta = prepare([str(root)], str(tmp_path / "s"), tokenizer=tokenizer, val_fraction=0.1, progress=False)
  token_store, docs = decoded_documents(tmp_path / "s")
  assert meta["split_by"] == "document" and token_store.meta["splits"] == meta["splits"]
  assert sorted(docs["train"] + docs["validation"]) == sorted(documents)  # each document once, whole
  assert 10 <= len(docs["validation"]) <= 55  # ~10% of 302
  assert meta["tokenizer"]["type"] == tokenizer.split(":")[0]
  assert meta["dtype"] == "uint16" and meta["sources"]["files"] == 3


def test_workers_do_not_change_the_store(corpus, tmp_path):
  root, _ = corpus
  one = prepare([str(root)], str(tmp_path / "one"), workers=1, progress=False)
  two = prepare([str(root)], str(tmp_path / "two"), workers=2, progress=False)
  assert one["splits"] == two["splits"]  # counts and checksums
  for split in store.SPLITS:
    a, b = store.TokenStore(str(tmp_path / "one")).read(split), store.TokenStore(str(tmp_path / "two")).read(split)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_a_single_text_file_is_split_by_tokens(tmp_path):
  text = "".join(TEXTS) * 50
  (tmp_path / "one.txt").write_text(text, encoding="utf-8")
  meta = prepare([str(tmp_path / "one.txt")], str(tmp_path / "s"), val_fraction=0.1, progress=False)
  assert meta["split_by"] == "tokens"
  token_store = store.TokenStore(str(tmp_path / "s"))
  train, val = token_store.read("train")[0], token_store.read("validation")[0]
  whole = np.concatenate([train, val])
  assert len(val) == len(whole) - int(len(whole) * 0.9)
  assert bytes(whole[:-1].astype(np.uint8)).decode() == text and whole[-1] == 257


def test_an_in_memory_store(corpus):
  root, documents = corpus
  url = "memory://prepare-test/"
  prepare([str(root)], url, progress=False)
  _, docs = decoded_documents(url)
  assert sorted(docs["train"] + docs["validation"]) == sorted(documents)
  with pytest.raises(UserError, match="already exists"):
    prepare([str(root)], url, progress=False)


def test_an_existing_output_is_refused_unless_overwrite(corpus, tmp_path):
  root, _ = corpus
  prepare([str(root / "a.txt"), str(root / "sub" / "b.txt")], str(tmp_path / "s"), progress=False)
  with pytest.raises(UserError, match="already exists") as e:
    prepare([str(root)], str(tmp_path / "s"), progress=False)
  assert "--overwrite" in e.value.hint
  meta = prepare([str(root)], str(tmp_path / "s"), overwrite=True, progress=False)
  assert meta["sources"]["files"] == 3 and store.TokenStore(str(tmp_path / "s")).meta["sources"]["files"] == 3
  assert [p for p in os.listdir(tmp_path) if ".partial-" in p] == []


def test_a_prepare_killed_before_it_commits_leaves_nothing_training_accepts(corpus, tmp_path, monkeypatch):
  root, _ = corpus

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # as if the process died before meta.json
  monkeypatch.setattr(store, "write_meta", killed)
  for output in (str(tmp_path / "s"), "memory://killed/"):
    with pytest.raises(KeyboardInterrupt):
      prepare([str(root)], output, progress=False)
  assert not (tmp_path / "s").exists()  # the partial folder never got the store's name
  partial = next(p for p in tmp_path.iterdir() if ".partial-" in p.name)
  for path in (str(partial), "memory://killed/"):
    with pytest.raises(UserError, match="not a prepared token store"):
      store.TokenStore(path)


def test_a_store_of_another_format_version_is_refused(corpus, tmp_path):
  root, _ = corpus
  prepare([str(root / "a.txt")], str(tmp_path / "s"), progress=False)
  meta = json.loads((tmp_path / "s" / "meta.json").read_text())
  meta["version"] = 99
  (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(UserError, match="version 99; this jaxlm reads") as e:
    store.TokenStore(str(tmp_path / "s"))
  assert "--overwrite" in e.value.hint


def test_damaged_tokens_fail_their_checksum(corpus, tmp_path):
  root, _ = corpus
  prepare([str(root)], str(tmp_path / "s"), progress=False)
  token_store = store.TokenStore(str(tmp_path / "s"))
  tokens = token_store.tokens("train")
  tokens[5:6].write(np.array([7], tokens.dtype.numpy_dtype)).result()
  with pytest.raises(UserError, match="do not match their checksum"):
    token_store.read("train")


def test_training_reads_a_store_and_keeps_its_tokenizer(corpus, tmp_path):
  root, _ = corpus
  prepare([str(root)], str(tmp_path / "s"), tokenizer="bpe:300", val_fraction=0.2, progress=False)
  config = tiny_config()
  config.mesh.data = -1
  config.data.path = str(tmp_path / "s")
  config.train.steps, config.train.eval_every = 4, 4
  result = loop.run(config, str(tmp_path / "w"), quiet=True)
  assert np.isfinite(result["val_loss"])
  saved = json.loads((tmp_path / "w" / "tokenizer.json").read_text())
  assert saved == json.loads(store.TokenStore(str(tmp_path / "s")).tokenizer_json)


@pytest.mark.parametrize("args, message", [
    ([], "missing --input"),
    (["--input=x"], "missing --output"),
    (["--input={root}", "--output={out}", "--tokenizer=bpe:many"], "the vocabulary size is not a number"),
    (["--input={root}", "--output={out}", "--tokenizer={root}/nope.json"], "neither byte, bpe:VOCAB nor"),
    (["--input={root}", "--output={out}", "--val_fraction=1.5"], "--val_fraction must be in (0, 1)"),
    (["--input={root}", "--output={out}", "--workers=0"], "--workers must be at least 1"),
    (["--input={root}", "--output={out}", "--bogus=1"], "Unknown command line flag 'bogus'"),
    (["--input={root}/missing", "--output={out}"], "missing"),
])
def test_prepare_mistakes_are_one_line_errors(corpus, tmp_path, capsys, args, message):
  root, _ = corpus
  argv = [a.format(root=root, out=tmp_path / "s") for a in args]
  capsys.readouterr()
  assert cli.main(["prepare", *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("jaxlm: error: ") and message in err, err


def test_bad_text_gives_one_line_errors(tmp_path, capsys):
  (tmp_path / "bad.txt").write_bytes(b"good text\n" * 3 + b"bad \xff byte")
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
  (tmp_path / "other.jsonl").write_text('{"body": "no text field"}\n', encoding="utf-8")
  out = tmp_path / "s"
  for argv, message in (
      ([f"--input={tmp_path}/bad.txt", "--strict_utf8"], "bad.txt: invalid UTF-8 at byte 34"),
      ([f"--input={tmp_path}/empty.txt"], "no text in"),
      ([f"--input={tmp_path}/broken.jsonl"], "broken.jsonl:2: not valid JSON"),
      ([f"--input={tmp_path}/other.jsonl"], "other.jsonl:1: no string field 'text'"),
  ):
    capsys.readouterr()
    assert cli.main(["prepare", *argv, f"--output={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxlm: error: ") and message in err, err
    assert not out.exists()
  capsys.readouterr()
  assert cli.main(["prepare", f"--input={tmp_path}/bad.txt", f"--output={out}"]) == 0
  assert "1 invalid UTF-8 sequences replaced" in capsys.readouterr().out


def test_the_prepare_command_reports_what_it_wrote(corpus, tmp_path, capsys):
  root, _ = corpus
  assert cli.main(["prepare", f"--input={root}", f"--output={tmp_path / 's'}", "--val_fraction=0.1"]) == 0
  out = capsys.readouterr().out
  assert f"{tmp_path / 's'}: 3 files, 302 documents" in out and "split by document" in out
  assert cli.main(["prepare", f"--input={root}", f"--output={tmp_path / 's'}"]) == 2
  assert "already exists (add --overwrite" in capsys.readouterr().err
