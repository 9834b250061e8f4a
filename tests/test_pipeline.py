"""The grain pipeline over a token store: process slices, epochs, exact restore, and multi-process training."""

import json
import os
import shutil

import grain
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from processes import spawn_jaxlm

from jaxlm import loop
from jaxlm.data import pipeline, store
from jaxlm.data.prepare import prepare
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.objectives.clm import OBJECTIVE as CLM

SEQ = 16
SHIFT = CLM.transform(None, 3, 0)  # the causal LM's batches (next-token pairs) of the rows


@pytest.fixture(scope="module")
def token_store(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  lines = [json.dumps({"text": f"Document {i}: " + "the fox and the crow " * (1 + i % 7)}) for i in range(400)]
  (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  meta = prepare([str(root / "docs.jsonl")], str(root / "store"), val_fraction=0.1, progress=False)
  return str(root / "store"), meta["splits"]["train"]["tokens"]


def batches(path, count, n, **kwargs):
  it = pipeline.StoreBatches(path, count, seq_len=SEQ, batch_size=8, seed=3, transform=SHIFT, **kwargs)
  return it, [next(it) for _ in range(n)]


def test_processes_read_only_their_rows_and_together_make_the_global_batch(token_store, monkeypatch):
  path, count = token_store
  read = {}
  original = pipeline._Windows.batch

  def recording(self, numbers):
    read.setdefault(id(self), []).extend(int(n) for n in numbers)
    return original(self, numbers)
  monkeypatch.setattr(pipeline._Windows, "batch", recording)
  one, whole = batches(path, count, 5)
  p0, part0 = batches(path, count, 5, process_index=0, process_count=2)
  p1, part1 = batches(path, count, 5, process_index=1, process_count=2)
  for b, x, y in zip(whole, part0, part1):
    for key in ("inputs", "targets"):
      assert np.array_equal(np.concatenate([x[key], y[key]]), b[key])
  # The global batches of window numbers (what every process computes; none of it is read).
  numbers = grain.MapDataset.range(pipeline.num_windows(count, SEQ)).shuffle(seed=3).repeat().batch(8)
  halves = [(set(numbers[b][:4].tolist()), set(numbers[b][4:].tolist())) for b in range(40)]
  mine0, mine1 = set(read[id(p0._batch.rows)]), set(read[id(p1._batch.rows)])  # (prefetch reads ahead)
  assert mine0 <= set().union(*(h[0] for h in halves)) and mine1 <= set().union(*(h[1] for h in halves))
  assert set().union(*(h[0] for h in halves[:5])) <= mine0 and set().union(*(h[1] for h in halves[:5])) <= mine1


def test_windows_are_next_token_pairs_inside_the_training_split(token_store):
  path, count = token_store
  train = store.TokenStore(path).read("train")[0].astype(np.int32)
  windows = pipeline.num_windows(count, SEQ)
  assert (windows - 1) * SEQ + SEQ + 1 <= len(train) < (windows + 1) * SEQ + 1  # all inside, none wasted
  epochs = 2
  numbers = grain.MapDataset.range(windows).shuffle(seed=3).repeat().batch(8)
  n_batches = -(-epochs * windows // 8)
  _, out = batches(path, count, n_batches)
  for b, batch_numbers in zip(out, (numbers[k] for k in range(n_batches))):
    want = np.stack([train[n * SEQ:n * SEQ + SEQ + 1] for n in batch_numbers])
    assert np.array_equal(b["inputs"], want[:, :-1]) and np.array_equal(b["targets"], want[:, 1:])
  flat = np.concatenate([numbers[k] for k in range(n_batches)])
  first, second = flat[:windows], flat[windows:2 * windows]
  assert sorted(first) == list(range(windows)) and sorted(second) == list(range(windows))  # each once
  assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(windows))  # reshuffled
  assert ByteTokenizer.EOS in np.concatenate([b["inputs"] for b in out])  # documents end with EOS


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restores_the_same_next_batches(token_store, workers):
  path, count = token_store
  it, _ = batches(path, count, 3, workers=workers)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  again = pipeline.StoreBatches(path, count, seq_len=SEQ, batch_size=8, seed=3, workers=workers, transform=SHIFT)
  again.set_state(state)
  assert again.step == 3
  for w in want:
    assert np.array_equal(next(again)["inputs"], w["inputs"])


def test_seeking_to_a_step_gives_that_steps_batch(token_store):
  path, count = token_store
  _, seq = batches(path, count, 6)
  it = pipeline.StoreBatches(path, count, seq_len=SEQ, batch_size=8, seed=3, transform=SHIFT)
  it.step = 4
  assert np.array_equal(next(it)["inputs"], seq[4]["inputs"]) and it.step == 5


def test_a_store_backed_run_resumes_exactly(token_store, tmp_path):
  path, _ = token_store
  config = tiny_config()
  config.mesh.data, config.data.path = -1, path
  loop.run(config, str(tmp_path / "a"), quiet=True)
  lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
  os.makedirs(tmp_path / "b")
  shutil.copytree(tmp_path / "a" / "checkpoints" / "3", tmp_path / "b" / "checkpoints" / "3")
  shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b")
  loop.run(config, str(tmp_path / "b"), quiet=True)
  again = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
  losses = lambda ls: [(m["step"], m["loss"]) for m in map(json.loads, ls) if "loss" in m and m["step"] > 3]
  assert losses(again) == losses(lines) and len(losses(lines)) == 3


def run_processes(workdir, path, processes, devices, steps=20):
  """`jaxlm train` from the store as `processes` local JAX processes of `devices` CPU devices each."""
  running = spawn_jaxlm(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={workdir}",
                         f"--config.data.path={path}", "--config.mesh.data=-1", f"--config.train.steps={steps}",
                         "--config.train.eval_every=10", "--config.train.checkpoint_every=10"],
                        devices=devices, processes=processes)
  for p in running:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(token_store, tmp_path):
  """2 processes x 2 CPU devices against 1 process x 4: the same 20 losses (float tolerance)."""
  path, _ = token_store
  one = run_processes(tmp_path / "one", path, processes=1, devices=4)
  two = run_processes(tmp_path / "two", path, processes=2, devices=2)
  pick = lambda ms: [(m["step"], m.get("loss", m.get("val_loss"))) for m in ms]
  assert [s for s, _ in pick(one)] == [s for s, _ in pick(two)] and len(pick(one)) >= 22
  for (_, a), (_, b) in zip(pick(one), pick(two)):
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
