"""Document packing: rows mark their documents, never cross the split, and a packed document is
trained on exactly as if it were alone."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from flax import nnx

from jaxlm import cli, loop
from jaxlm.data import pipeline, store
from jaxlm.data.packing import Packer
from jaxlm.data.prepare import prepare
from jaxlm.data.text import load_data
from jaxlm.errors import UserError
from jaxlm.models.decoder import GPT
from jaxlm.models.transformer import ModelConfig
from jaxlm.objectives.clm import OBJECTIVE as CLM
from jaxlm.objectives.clm import next_token

EOS, SEQ = 257, 16


def documents(lengths, seed=0):
  """Documents of the given lengths (the last token of each is EOS) and their offsets."""
  rng = np.random.default_rng(seed)
  docs = [np.append(rng.integers(0, 256, n - 1), EOS).astype(np.int32) for n in lengths]
  return docs, np.concatenate([[0], np.cumsum(lengths)])


def segments(row):
  """The row's segments as (segment id, slice)."""
  ids = row["segment_ids"]
  cuts = np.flatnonzero(np.diff(ids)) + 1
  return [(int(ids[a]), slice(a, b)) for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]]))]


def test_rows_mark_documents_and_cover_each_token_once_per_epoch():
  lengths = [3, 40, 1, 7, 16, 16, 25, 2, 9, 30]
  docs, offsets = documents(lengths)
  tokens = np.concatenate(docs)
  packer = Packer(offsets, SEQ, seed=5, eos=EOS)
  assert packer.rows_per_epoch == sum(lengths) // SEQ
  rows = next_token(packer.rows_from_array(range(2 * packer.rows_per_epoch), tokens))
  assert rows["inputs"].shape == (2 * packer.rows_per_epoch, SEQ)
  seen = [[], []]  # per epoch: (document, token index) of every target
  for r in range(len(rows["inputs"])):
    row = {k: v[r] for k, v in rows.items()}
    ids = [i for i, _ in segments(row)]
    assert ids == list(range(1, len(ids) + 1)), "segments are numbered 1, 2, ... in order"
    for (d, a, b), (_, where) in zip(packer.pieces(r), segments(row)):
      doc = docs[d]
      assert np.array_equal(row["targets"][where], doc[a:b]), "targets are one piece of one document"
      want_inputs = np.concatenate([[EOS], doc])[a:b]  # EOS before the first token, else the previous one
      assert np.array_equal(row["inputs"][where], want_inputs)
      assert np.array_equal(row["positions"][where], np.arange(b - a)), "positions restart per segment"
      seen[r // packer.rows_per_epoch] += [(d, i) for i in range(a, b)]
  for epoch in seen:
    assert len(epoch) == len(set(epoch)) == packer.rows_per_epoch * SEQ  # nothing twice, nothing padded
  first = [d for d, _ in dict.fromkeys((d, 0) for d, _ in seen[0])]
  second = [d for d, _ in dict.fromkeys((d, 0) for d, _ in seen[1])]
  assert first != second, "each epoch shuffles the documents anew"


def test_rows_are_a_pure_function_of_their_number():
  _, offsets = documents([5, 9, 33, 4, 12] * 4)
  a, b = Packer(offsets, SEQ, seed=1, eos=EOS), Packer(offsets, SEQ, seed=1, eos=EOS)
  order = [7, 0, 40, 3, 12, 3, 1]  # (row 40 is in the third epoch)
  for r in sorted(order, reverse=True):
    b.pieces(r)  # b visits the rows in another order first
  assert [a.pieces(r) for r in order] == [b.pieces(r) for r in order]
  assert Packer(offsets, SEQ, seed=2, eos=EOS).pieces(0) != a.pieces(0)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_a_packed_document_gets_the_logits_it_gets_alone(position):
  cfg = ModelConfig(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=32,
                    position=position)
  model = GPT(cfg, rngs=nnx.Rngs(params=0))
  docs, offsets = documents([5, 30, 11, 2, 20])
  packer = Packer(offsets, SEQ, seed=0, eos=EOS)
  rows = next_token(packer.rows_from_array(range(packer.rows_per_epoch), np.concatenate(docs)))
  packed = model(jnp.asarray(rows["inputs"]), segment_ids_BxT=jnp.asarray(rows["segment_ids"]),
                 positions_BxT=jnp.asarray(rows["positions"]))
  unmasked = model(jnp.asarray(rows["inputs"]))
  checked = 0
  for r in range(len(rows["inputs"])):
    for _, where in segments({k: v[r] for k, v in rows.items()}):
      alone = model(jnp.asarray(rows["inputs"][r, where])[None])[0]
      np.testing.assert_allclose(packed[r, where], alone, rtol=2e-5, atol=2e-5)
      checked += 1
  assert checked > len(rows["inputs"])  # some rows hold several documents
  assert not np.allclose(packed, unmasked, atol=1e-3), "without segments, documents would see each other"


@pytest.fixture(scope="module")
def packed_store(tmp_path_factory):
  root = tmp_path_factory.mktemp("packing")
  lines = [json.dumps({"text": f"Doc {i}. " + "the fox and the crow " * (i % 5)}) for i in range(300)]
  (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  prepare([str(root / "docs.jsonl")], str(root / "store"), val_fraction=0.2, progress=False)
  return str(root / "store")


def test_packed_rows_never_cross_the_split(packed_store):
  token_store = store.TokenStore(packed_store)
  config = tiny_config()
  config.data.path, config.data.sequences = packed_store, "packed"
  corpus = load_data(config.data)
  kwargs = dict(seq_len=SEQ, batch_size=8, seed=3)
  shift = CLM.transform(corpus.tokenizer, 3, 0)
  splits = {s: token_store.read(s) for s in store.SPLITS}
  def documents_of(split):
    tokens, offsets = splits[split]
    return [tokens[a:b].astype(np.int32) for a, b in zip(offsets[:-1], offsets[1:])]

  def check(batch, docs):
    text = {d.tobytes() for d in docs}
    for r in range(len(batch["targets"])):
      row = {k: v[r] for k, v in batch.items()}
      for _, where in segments(row):
        piece = row["targets"][where].astype(np.int32).tobytes()
        assert any(piece in t for t in text), "each segment is a piece of one document of this split"
    return len(batch["targets"])

  train_docs, val_docs = documents_of("train"), documents_of("validation")
  it = corpus.train_batches(transform=shift, **kwargs)
  assert sum(check(next(it), train_docs) for _ in range(20)) == 160
  assert sum(check(next_token(b), val_docs) for b in corpus.eval_batches(num_batches=3, **kwargs)) == 24
  # The store-backed rows are exactly the packer's rows over the training split read in memory.
  again = corpus.train_batches(transform=shift, **kwargs)
  first = next(again)
  packer = Packer(splits["train"][1], SEQ, 3, EOS)
  want = next_token(packer.rows_from_array(range(8), splits["train"][0]))
  for key in ("inputs", "targets", "segment_ids", "positions"):
    assert np.array_equal(first[key], want[key])


def test_packed_batches_split_over_processes_and_restore(packed_store):
  config = tiny_config()
  config.data.path, config.data.sequences = packed_store, "packed"
  corpus = load_data(config.data)
  kwargs = dict(seq_len=SEQ, batch_size=8, seed=3)
  whole = corpus.train_batches(**kwargs)
  halves = [corpus.train_batches(process_index=p, process_count=2, **kwargs) for p in (0, 1)]
  for _ in range(3):
    b, x, y = next(whole), next(halves[0]), next(halves[1])
    for key in b:
      assert np.array_equal(np.concatenate([x[key], y[key]]), b[key])
  state = whole.get_state()
  want = [next(whole) for _ in range(2)]
  again = corpus.train_batches(workers=2, **kwargs)
  again.set_state(state)
  for w in want:
    got = next(again)
    assert all(np.array_equal(got[k], w[k]) for k in w)
  assert isinstance(again, pipeline.StoreBatches)


def test_training_on_packed_documents_runs_and_learns(packed_store, tmp_path):
  config = tiny_config()
  config.mesh.data, config.data.path, config.data.sequences = -1, packed_store, "packed"
  config.train.steps, config.train.eval_every, config.train.checkpoint_every = 30, 10, 30
  last = loop.run(config, str(tmp_path), quiet=True)
  losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [m["loss"] for m in losses if "loss" in m]
  assert np.isfinite(last["val_loss"]) and np.mean(train[-5:]) < np.mean(train[:5]) - 0.5


def test_packing_plain_text_is_refused(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("some text " * 200)
  config = tiny_config()
  config.data.path, config.data.sequences = str(tmp_path / "a.txt"), "packed"
  with pytest.raises(UserError, match="packs the documents of a prepared token store"):
    load_data(config.data)
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.mesh.data=-1",
                   "--config.data.sequences=packed"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("jaxlm: error: data.sequences=packed")
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.mesh.data=-1",
                   "--config.data.sequences=bins"])
  assert code == 2 and "not one of windows, packed" in capsys.readouterr().err


def test_evaluation_rows_of_a_packed_run_cut_documents_as_training_does():
  """`jaxlm eval` of a packed run: consecutive rows, each token a target once, every document piece its
  own segment with positions from 0 (what the packer gives a piece), EOS before a document's start."""
  from jaxlm.evaluate import stream_rows

  docs, offsets = documents([5, 30, 11, 2, 20, 9])
  tokens = np.concatenate(docs)
  rows = [next_token(r) for r in stream_rows(tokens, SEQ, 4, offsets=offsets)]
  seen = []
  for batch in rows:
    for r in range(len(batch["targets"])):
      row = {k: v[r] for k, v in batch.items()}
      counted = row["weights"] > 0
      for s, where in segments(row):
        if not counted[where].any():
          continue  # (padding)
        assert np.array_equal(row["positions"][where], np.arange(where.stop - where.start))
        piece = row["targets"][where]
        assert any(piece.tobytes() in d.tobytes() for d in docs), "a segment is a piece of one document"
        if row["positions"][where.start] == 0 and piece.tobytes() in [d[:len(piece)].tobytes() for d in docs]:
          assert row["inputs"][where.start] == EOS or where.start == 0
      seen.append(row["targets"][counted])
  assert np.array_equal(np.concatenate(seen), tokens[1:]), "every token after the first, once, in order"


def test_a_masked_lm_trains_on_packed_documents(packed_store, tmp_path):
  config = tiny_config()
  config.mesh.data, config.data.path, config.data.sequences = -1, packed_store, "packed"
  config.objective = "mlm"
  last = loop.run(config, str(tmp_path), quiet=True)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in lines if "val_accuracy" in m] == [3, 6]
  assert 0 < last["val_accuracy"] < 1 and np.isfinite(last["val_loss"]) and "accuracy" in last
