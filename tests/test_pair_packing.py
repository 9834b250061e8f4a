"""Packing of encoder-decoder examples: every example once per epoch, both sides within their lengths,
greedy, truncated as T5 does, and a pure function of (seed, row number)."""

import json
import pickle
import time

import numpy as np
import pytest

from jaxlm.data import store
from jaxlm.data.pairs import PairPacker, example_lengths, split_example
from jaxlm.data.prepare import prepare
from jaxlm.data.tokenizer import load_tokenizer_json

EOS, PAD, SEQ, TARGET = 257, 258, 16, 8


def pairs_split(prompt_lengths, response_lengths, seed=0):
  """A pairs split as a store holds it: per example the prompt (weight 0), the response and EOS (weight 1).
  Returns (tokens, weights, offsets)."""
  rng = np.random.default_rng(seed)
  tokens, weights = [], []
  for p, r in zip(prompt_lengths, response_lengths):
    tokens.append(np.append(rng.integers(0, 256, p + r), EOS))
    weights.append(np.repeat(np.uint8([0, 1]), [p, r + 1]))
  offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
  return np.concatenate(tokens).astype(np.int32), np.concatenate(weights), offsets


def random_split(n=60, seed=0):
  """n examples of random lengths, some of them over SEQ (inputs) or TARGET (targets)."""
  rng = np.random.default_rng(seed)
  return pairs_split(rng.integers(0, 22, n), rng.integers(0, 10, n), seed)


def packer(tokens, weights, offsets, **kwargs):
  kwargs = {"seq_len": SEQ, "target_len": TARGET, "seed": 3, "pad": PAD, **kwargs}
  return PairPacker(offsets, *example_lengths(offsets, weights), **kwargs)


def epoch_rows(p, tokens, weights, epoch=0):
  """The rows of one epoch, as a list of dicts."""
  n = p.rows_per_epoch
  batch = p.rows_from_array(range(epoch * n, (epoch + 1) * n), tokens, weights)
  return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def unpack(row, side):
  """segment id -> that segment's tokens on one side ("input" or "target") of a row."""
  ids, values = row[f"{side}_segment_ids"], row["inputs" if side == "input" else "targets"]
  return {int(s): values[ids == s] for s in np.unique(ids[ids > 0])}


def truncated(tokens, weights, offsets, d):
  """Document d's example as the packer must lay it out: its input + EOS and target, cut to SEQ, TARGET."""
  a, b = offsets[d], offsets[d + 1]
  inputs, targets = split_example(tokens[a:b], weights[a:b], EOS)
  return inputs[:SEQ], targets[:TARGET]


@pytest.mark.parametrize("shuffle", [True, False])
def test_unpacking_an_epoch_gives_back_every_example_once(shuffle):
  tokens, weights, offsets = random_split()
  p = packer(tokens, weights, offsets, shuffle=shuffle)
  for epoch in range(2):
    seen = []
    for r, row in enumerate(epoch_rows(p, tokens, weights, epoch)):
      pieces = p.pieces(epoch * p.rows_per_epoch + r)
      inputs, targets = unpack(row, "input"), unpack(row, "target")
      assert list(inputs) == list(targets) == list(range(1, len(pieces) + 1)), "a segment per example"
      for s, d in enumerate(pieces, start=1):
        want_inputs, want_targets = truncated(tokens, weights, offsets, d)
        assert np.array_equal(inputs[s], want_inputs) and np.array_equal(targets[s], want_targets)
      seen += pieces
    assert sorted(seen) == list(range(len(offsets) - 1))


def test_sides_fit_positions_restart_and_padding_is_segment_zero():
  tokens, weights, offsets = random_split(seed=1)
  p = packer(tokens, weights, offsets)
  for row in epoch_rows(p, tokens, weights):
    assert all(v.dtype == np.int32 for v in row.values())
    for side, values, length in (("input", row["inputs"], SEQ), ("target", row["targets"], TARGET)):
      ids, positions = row[f"{side}_segment_ids"], row[f"{side}_positions"]
      assert ids.shape == positions.shape == values.shape == (length,)
      used = np.count_nonzero(ids)
      assert np.all(ids[:used] > 0) and np.all(np.diff(ids[:used]) >= 0), "examples first, in order"
      assert np.all(ids[used:] == 0) and np.all(values[used:] == PAD) and np.all(positions[used:] == 0)
      for s in np.unique(ids[:used]):
        assert np.array_equal(positions[ids == s], np.arange(np.count_nonzero(ids == s)))


def test_packing_is_greedy_in_plan_order():
  tokens, weights, offsets = random_split(n=200, seed=2)
  p = packer(tokens, weights, offsets)
  inputs, targets = example_lengths(offsets, weights)
  inputs, targets = np.minimum(inputs, SEQ), np.minimum(targets, TARGET)
  plan = [p.order[a:b].tolist() for a, b in zip(p.row_starts[:-1], p.row_starts[1:])]
  assert sum(plan, []) == p.order.tolist() and sorted(p.order.tolist()) == list(range(200))
  for rows, following in zip(plan, plan[1:] + [None]):
    assert inputs[rows].sum() <= SEQ and targets[rows].sum() <= TARGET
    if following is not None:
      nxt = following[0]
      assert inputs[rows].sum() + inputs[nxt] > SEQ or targets[rows].sum() + targets[nxt] > TARGET, "greedy"
  assert sorted(p.pieces(r) for r in range(p.rows_per_epoch)) == sorted(plan), "an epoch is the plan's rows"
  assert p.rows_per_epoch == len(plan)


def test_truncation_keeps_the_first_tokens_and_counts_each_side():
  # inputs of 16 (15 + EOS: fits), 17 (cut), 30 (cut), 1 (an empty prompt); targets of 8 (fits), 9, 12 (cut)
  prompts, responses = [15, 16, 29, 0, 3], [7, 2, 8, 11, 0]
  tokens, weights, offsets = pairs_split(prompts, responses)
  p = packer(tokens, weights, offsets, shuffle=False)
  assert (p.truncated_inputs, p.truncated_targets) == (2, 2)
  rows = epoch_rows(p, tokens, weights)
  assert [p.pieces(r) for r in range(p.rows_per_epoch)] == [[0], [1], [2], [3], [4]]
  cut = unpack(rows[1], "input")[1]
  assert len(cut) == SEQ and np.array_equal(cut, tokens[offsets[1]:offsets[1] + SEQ]), "its first SEQ, no EOS"
  assert np.array_equal(unpack(rows[0], "input")[1], np.append(tokens[:15], EOS))
  assert np.array_equal(unpack(rows[3], "input")[1], [EOS]), "an empty prompt is just EOS"
  assert np.array_equal(unpack(rows[3], "target")[1], tokens[offsets[3]:offsets[3] + TARGET])


def test_rows_are_a_pure_function_of_seed_and_row_number():
  tokens, weights, offsets = random_split(seed=4)
  a, b = packer(tokens, weights, offsets), packer(tokens, weights, offsets)
  order = [7, 0, 3 * a.rows_per_epoch + 2, 3, a.rows_per_epoch + 5, 3, 1]
  for r in sorted(order, reverse=True):
    b.pieces(r)  # b visits the rows in another order first
  copy = pickle.loads(pickle.dumps(b))
  assert copy.__getstate__()["_rows"] is None and b.__getstate__()["_rows"] is None, "no cache travels"
  assert [a.pieces(r) for r in order] == [b.pieces(r) for r in order] == [copy.pieces(r) for r in order]
  want = a.rows_from_array(order, tokens, weights)
  got = copy.rows_from_array(order, tokens, weights)
  assert all(np.array_equal(want[k], got[k]) for k in want)
  other = packer(tokens, weights, offsets, seed=4)
  assert [other.pieces(r) for r in range(5)] != [a.pieces(r) for r in range(5)], "another seed, other rows"


def test_epochs_visit_the_same_rows_in_new_orders():
  tokens, weights, offsets = random_split(seed=5)
  p = packer(tokens, weights, offsets)
  n = p.rows_per_epoch
  epochs = [[p.pieces(e * n + r) for r in range(n)] for e in range(3)]
  assert epochs[0] != epochs[1] != epochs[2]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])


def test_without_shuffle_rows_keep_the_document_order():
  tokens, weights, offsets = random_split(seed=6)
  p = packer(tokens, weights, offsets, shuffle=False)
  n = p.rows_per_epoch
  for e in range(2):
    assert sum((p.pieces(e * n + r) for r in range(n)), []) == list(range(len(offsets) - 1))


def test_example_lengths_match_a_loop_over_documents():
  rng = np.random.default_rng(7)
  lengths = rng.integers(0, 30, 500)
  lengths[[0, 17, 18, 499]] = 0  # empty documents (a store has none) count as an EOS-only input
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  weights = (rng.random(offsets[-1]) < 0.4).astype(np.uint8)
  inputs, targets = example_lengths(offsets, weights)
  want = [(int(np.sum(weights[a:b] == 0)) + 1, int(np.sum(weights[a:b])))
          for a, b in zip(offsets, offsets[1:])]
  assert list(zip(inputs.tolist(), targets.tolist())) == want


def test_a_prepared_pairs_store_packs_prompt_eos_and_response_eos(tmp_path):
  examples = [{"prompt": f"Question {n}?", "response": "Yes." * (1 + n % 5)} for n in range(12)]
  (tmp_path / "e.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
  prepare([str(tmp_path / "e.jsonl")], str(tmp_path / "s"), pairs=("prompt", "response"),
          val_fraction=0.2, progress=False)
  token_store = store.TokenStore(str(tmp_path / "s"))
  tok = load_tokenizer_json(token_store.tokenizer_json)
  tokens, offsets = token_store.read("train")
  weights = token_store.read_weights("train")
  lengths = example_lengths(offsets, weights)
  p = PairPacker(offsets, *lengths, seq_len=48, target_len=24, seed=0, pad=tok.PAD)
  assert p.truncated_inputs == p.truncated_targets == 0 and p.rows_per_epoch < len(offsets) - 1, "packed"
  texts = []
  for row in epoch_rows(p, tokens, weights):
    inputs, targets = unpack(row, "input"), unpack(row, "target")
    for s in inputs:
      assert inputs[s][-1] == targets[s][-1] == tok.EOS
      texts.append((tok.decode(inputs[s][:-1].tolist()), tok.decode(targets[s][:-1].tolist())))
  assert len(texts) == len(set(texts)) == len(offsets) - 1, "each example of the split once"
  assert set(texts) <= {(e["prompt"], e["response"]) for e in examples}


def test_the_plan_of_a_million_examples_takes_under_a_second():
  rng = np.random.default_rng(8)
  n = 1_000_000
  inputs, targets = rng.integers(1, 200, n), rng.integers(1, 100, n)
  offsets = np.concatenate([[0], np.cumsum(inputs - 1 + targets)])
  begin = time.perf_counter()
  p = PairPacker(offsets, inputs, targets, seq_len=512, target_len=128, seed=0, pad=0)
  seconds = time.perf_counter() - begin
  print(f"plan of {n} examples into {p.rows_per_epoch} rows: {seconds:.3f} s")
  assert seconds < 5  # ~0.3 s measured on 2 shared cores; generous against their load
  assert p.row_starts[-1] == n and p.rows_per_epoch == len(p.row_starts) - 1
