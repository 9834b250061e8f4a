"""`jaxlm prepare`: text -> token store -> training, with exact round trips and clear refusals."""

import gzip
import itertools
import json
import multiprocessing.pool
import os
import queue
import re
import signal
import threading
import time

import numpy as np
import pytest
from conftest import tiny_config
from processes import spawn_jaxlm

from jaxlm import cli, loop
from jaxlm.data import prepare as prepare_module
from jaxlm.data import store
from jaxlm.data.prepare import prepare
from jaxlm.data.text import load_data
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
    docs = [tokens[a:b] for a, b in itertools.pairwise(offsets)]
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
  three = prepare([str(root)], str(tmp_path / "three"), workers=3, unit_bytes=300, progress=False)  # ~30 units
  assert one["splits"] == two["splits"] == three["splits"]  # counts and checksums
  for split in store.SPLITS:
    a = store.TokenStore(str(tmp_path / "one")).read(split)
    for other in ("two", "three"):
      b = store.TokenStore(str(tmp_path / other)).read(split)
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


def store_files(path) -> dict:
  """Every file of a local store: its path in the store -> its bytes (meta.json without `seconds`)."""
  out = {}
  for folder, _, names in os.walk(path):
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        data = f.read()
      if name == store.META:
        data = {k: v for k, v in json.loads(data).items() if k != "seconds"}
      out[os.path.relpath(os.path.join(folder, name), path)] = data
  return out


def expected_splits(documents, tokenizer, val_fraction, seed=0):
  """split -> (tokens, offsets) as the specification says: document by document, in memory."""
  parts = {s: [] for s in store.SPLITS}
  for n, doc in enumerate(documents):
    to_val = np.random.default_rng([seed, n]).random() < val_fraction
    parts["validation" if to_val else "train"].append(tokenizer.encode(doc, eos=True))
  return {s: (np.concatenate(docs), np.cumsum([0] + [len(d) for d in docs])) for s, docs in parts.items()}


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_streaming_gives_the_same_store_whatever_the_units_buffer_and_workers(tmp_path, tokenizer):
  big = "".join(TEXTS) * 400  # ~140K tokens: more than the 1-chunk buffer below
  documents = [TEXTS[i % len(TEXTS)] * (1 + i % 13) for i in range(300)]
  documents[40:40], documents[200:200] = [big], [big[::-1]]
  lines = [json.dumps({"text": d}) + "\n" for d in documents]
  (tmp_path / "docs.jsonl").write_text("".join(lines), encoding="utf-8")
  if tokenizer == "bpe":  # one tokenizer for every run; its per-document `encode` makes the expectation
    from jaxlm.data.bpe import BPETokenizer

    tokenizer = str(tmp_path / "bpe.json")
    (tmp_path / "bpe.json").write_text(BPETokenizer.train(documents, 400).to_json())
  runs = {"whole": {}, "tiny units and buffer": {"unit_bytes": 100, "buffer_chunks": 1},
          "and 3 workers": {"unit_bytes": 100, "buffer_chunks": 1, "workers": 3}}
  for name, kwargs in runs.items():
    prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / name), tokenizer=tokenizer, val_fraction=0.3,
            progress=False, **kwargs)
  files = [store_files(tmp_path / name) for name in runs]
  assert files[0] == files[1] == files[2]  # byte for byte
  token_store = store.TokenStore(str(tmp_path / "whole"))
  want = expected_splits(documents, load_tokenizer_json(token_store.tokenizer_json), 0.3)
  for split in store.SPLITS:
    tokens, offsets = token_store.read(split)
    assert np.array_equal(tokens, want[split][0]) and np.array_equal(offsets, want[split][1])
  assert max(np.diff(token_store.read("train")[1])) > store.CHUNK  # a document bigger than the buffer


def test_at_most_two_units_per_worker_are_in_flight(corpus, tmp_path, monkeypatch):
  """Memory stays bounded: the parent reads a unit only when fewer than 2 x workers are out."""
  root, _ = corpus
  count = {"read": 0, "submitted": 0, "taken": 0, "in_flight": 0, "read_ahead": 0}
  units = prepare_module._units
  submit, take = multiprocessing.pool.Pool.apply_async, multiprocessing.pool.ApplyResult.get

  def reading(*args):
    for unit in units(*args):
      count["read"] += 1
      count["read_ahead"] = max(count["read_ahead"], count["read"] - count["taken"])
      yield unit

  def submitting(self, *args, **kwargs):
    count["submitted"] += 1
    count["in_flight"] = max(count["in_flight"], count["submitted"] - count["taken"])
    return submit(self, *args, **kwargs)

  def taking(self, *args, **kwargs):
    count["taken"] += 1
    return take(self, *args, **kwargs)
  monkeypatch.setattr(prepare_module, "_units", reading)
  monkeypatch.setattr(multiprocessing.pool.Pool, "apply_async", submitting)
  monkeypatch.setattr(multiprocessing.pool.ApplyResult, "get", taking)
  prepare([str(root)], str(tmp_path / "s"), workers=2, unit_bytes=300, progress=False)
  assert count["read"] == count["submitted"] == count["taken"] > 20
  assert count["in_flight"] == 4 and count["read_ahead"] == 5  # 4 out, and the one waiting for a slot


@pytest.mark.parametrize("repeats, val_fraction", [(700, 0.1), (700, 0.9), (20, 0.9)])
def test_split_by_tokens_cuts_the_store_as_if_each_split_were_written_at_once(tmp_path, repeats, val_fraction):
  assert 0.1 < np.random.default_rng([0, 0]).random() < 0.9  # the document goes to train at 0.1, else validation
  text = "".join(TEXTS) * repeats  # 700: ~230K tokens, several chunks
  (tmp_path / "one.txt").write_text(text, encoding="utf-8")
  meta = prepare([str(tmp_path / "one.txt")], str(tmp_path / "s"), val_fraction=val_fraction, buffer_chunks=1,
                 progress=False)
  assert meta["split_by"] == "tokens"
  token_store = store.TokenStore(str(tmp_path / "s"))
  (train, train_offsets), (val, val_offsets) = token_store.read("train"), token_store.read("validation")
  whole = np.concatenate([train, val])
  assert bytes(whole[:-1].astype(np.uint8)).decode() == text and whole[-1] == 257
  assert len(train) == int(len(whole) * (1 - val_fraction))
  assert list(train_offsets) == [0, len(train)] and list(val_offsets) == [0, len(val)]
  for split, tokens in (("train", train), ("validation", val)):
    store.write_array(str(tmp_path / "fresh"), split, tokens)
    assert store_files(tmp_path / "s" / split / "tokens") == store_files(tmp_path / "fresh" / split)


def test_a_new_prepare_removes_the_folders_of_killed_ones(corpus, tmp_path, capsys):
  root, _ = corpus
  (tmp_path / "s.partial-abc123" / "train").mkdir(parents=True)
  (tmp_path / "s2.partial-xyz").mkdir()  # another store's
  capsys.readouterr()
  prepare([str(root)], str(tmp_path / "s"), progress=False)
  err = capsys.readouterr().err.splitlines()
  assert err == [f"jaxlm: warning: removing {tmp_path / 's.partial-abc123'} left by an interrupted prepare"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "s2.partial-xyz"]


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


def write_jsonl(path, documents: int, length: int) -> np.ndarray:
  """A JSONL file of `documents` random texts of `length` ASCII characters, each starting with its number
  (8 digits); returns the texts as a (documents, length) uint8 array. Fast: built as one numpy array."""
  alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz    ", np.uint8)
  texts_NxL = alphabet[np.random.default_rng(0).integers(0, len(alphabet), (documents, length))]
  for digit in range(8):
    texts_NxL[:, digit] = ord("0") + np.arange(documents) // 10 ** (7 - digit) % 10
  head, tail = np.frombuffer(b'{"text": "', np.uint8), np.frombuffer(b'"}\n', np.uint8)
  lines = np.concatenate([np.broadcast_to(head, (documents, len(head))), texts_NxL,
                          np.broadcast_to(tail, (documents, len(tail)))], axis=1)
  with open(path, "wb") as f:
    f.write(lines.tobytes())
  return texts_NxL


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
  """~35 MB of JSONL, 160K documents: prepare takes a few seconds and shows progress 4 times on the way."""
  path = tmp_path_factory.mktemp("big") / "big.jsonl"
  return path, write_jsonl(path, 160_000, 200)


def lines_of(stream) -> queue.Queue:
  """The lines of a text stream, put in a queue by a thread (then None), so that waiting can time out."""
  lines = queue.Queue()

  def read():
    for line in stream:
      lines.put(line)
    lines.put(None)
  threading.Thread(target=read, daemon=True).start()
  return lines


def kill_part_way(proc, written) -> None:
  """SIGKILLs `proc`, a `jaxlm prepare`, once its progress shows it part-way and `written()` is true."""
  lines, seen = lines_of(proc.stdout), [""]
  while not re.search(r"\d+\.\d%", seen[-1]):
    seen.append(lines.get(timeout=300))
    assert seen[-1] is not None, f"prepare ended before any progress: {seen}, {proc.stderr.read()}"
  assert "100.0%" not in seen[-1], f"prepare finished before it could be killed; use a bigger corpus: {seen}"
  while not written():
    assert proc.poll() is None, f"prepare ended before it could be killed; use a bigger corpus: {seen}"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL, f"prepare ended before the kill: {seen}"


def test_a_sigkilled_prepare_leaves_nothing_training_accepts_and_the_next_one_cleans_up(big_corpus, tmp_path,
                                                                                         capsys):
  path, texts_NxL = big_corpus
  out = tmp_path / "s"
  proc = spawn_jaxlm(["prepare", f"--input={path}", f"--output={out}"], devices=1)[0]
  try:
    kill_part_way(proc, lambda: any(tmp_path.glob("s.partial-*/train/tokens/c/*")))  # tokens on disk
  finally:
    proc.kill()
  partial = [p for p in tmp_path.iterdir() if p.name.startswith("s.partial-")]
  assert not out.exists() and len(partial) == 1
  config = tiny_config()
  for path_ in (out, partial[0]):
    with pytest.raises(UserError, match="not a prepared token store"):
      store.TokenStore(str(path_))
    config.data.path = str(path_)
    with pytest.raises(UserError, match="does not exist|not a prepared token store"):
      load_data(config.data)

  capsys.readouterr()
  assert cli.main(["prepare", f"--input={path}", f"--output={out}"]) == 0
  assert capsys.readouterr().err.splitlines() == [
      f"jaxlm: warning: removing {partial[0]} left by an interrupted prepare"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
  token_store, numbers = store.TokenStore(str(out)), []
  for split in store.SPLITS:
    tokens, offsets = token_store.read(split)  # (checks the counts and the checksum)
    docs_NxL1 = tokens.reshape(-1, texts_NxL.shape[1] + 1)
    number_N = (docs_NxL1[:, :8].astype(np.int64) - ord("0")) @ 10 ** np.arange(7, -1, -1)
    assert np.array_equal(docs_NxL1[:, :-1], texts_NxL[number_N]) and (docs_NxL1[:, -1] == 257).all()
    assert np.array_equal(offsets, np.arange(len(docs_NxL1) + 1) * docs_NxL1.shape[1])
    numbers.append(number_N)
  assert all(np.all(np.diff(n) > 0) for n in numbers)  # in order
  assert np.array_equal(np.sort(np.concatenate(numbers)), np.arange(len(texts_NxL)))  # each document once


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
    assert not out.exists() and not list(tmp_path.glob("s.partial-*"))  # a mistake leaves no partial folder
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
