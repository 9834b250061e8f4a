"""Span corruption: T5's counts and lengths, exact input lengths for every inputs_len, spans that
alternate from non-noise, sentinels in order, nothing lost (merge undoes corrupt), T5's noise statistics,
rows that depend on their place in the global batch only, and a batch in a few milliseconds."""

import timeit

import numpy as np
import pytest

from jaxlm.data import spans

EOS, VOCAB = 1, 32_000
SENTINELS = np.arange(VOCAB + 99, VOCAB - 1, -1)  # T5's: the 100 ids after the text vocabulary, from the top
RECIPES = [(512, 0.15, 3.0), (3, 0.15, 3.0), (4, 0.15, 3.0), (9, 0.15, 1.0), (20, 0.01, 3.0), (40, 0.05, 3.0),
           (64, 0.15, 1.0), (100, 0.5, 1.0), (57, 0.9, 1.0), (33, 0.3, 10.0), (200, 0.5, 3.0)]


def raw_rows(b, raw_len, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (b, raw_len)).astype(np.int32)


def runs(mask_L):
  """The run lengths of a bool row, and whether each run is noise."""
  edges = np.flatnonzero(np.diff(mask_L.astype(np.int8))) + 1
  bounds = np.concatenate([[0], edges, [len(mask_L)]])
  return np.diff(bounds), mask_L[bounds[:-1]]


def t5_lengths(raw_len, density, mean_span):
  """T5's random_spans_helper arithmetic as T5 writes it (np.round rounds halves to even, like tf.round)."""
  num_noise = int(min(max(np.round(raw_len * density), 1), raw_len - 1))
  num_spans = int(max(np.round(num_noise / mean_span), 1))
  return raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1


def test_t5_reference_512_inputs_come_from_568_raw_tokens_and_make_114_targets():
  r = spans.recipe(512, spans.NOISE_DENSITY, spans.MEAN_NOISE_SPAN_LENGTH)
  assert spans.raw_length(512, 0.15, 3.0) == r.raw_len == 568
  assert (r.inputs_len, r.targets_len) == (512, 114)
  assert spans.lengths_for(568, 0.15, 3.0) == (512, 114)
  assert spans.span_counts(568, 0.15, 3.0) == (r.num_noise, r.num_spans) == (85, 28)


def test_counts_match_t5_wherever_its_spans_fit():
  for density, mean_span in [(0.15, 3.0), (0.15, 1.0), (0.3, 5.0), (0.5, 3.0), (0.05, 2.5)]:
    for raw_len in range(2, 3000):
      assert spans.lengths_for(raw_len, density, mean_span) == t5_lengths(raw_len, density, mean_span)


def test_halves_round_to_even_like_tf_round():
  assert spans.span_counts(10, 0.15, 3.0)[0] == 2  # 10 * 0.15 = 1.5 -> 2
  assert spans.span_counts(30, 0.15, 3.0)[0] == 4  # 4.5 -> 4
  assert spans.span_counts(100, 0.15, 6.0)[1] == 2  # 15 noise / 6 = 2.5 -> 2
  assert spans.span_counts(20, 0.15, 2.0)[1] == 2  # 3 noise / 2 = 1.5 -> 2


def test_at_least_one_token_is_kept_and_one_hidden_and_no_span_is_empty():
  assert spans.span_counts(2, 0.15, 3.0) == (1, 1)
  assert spans.span_counts(5, 0.01, 3.0) == (1, 1)  # 0.05 noise tokens round to 0: still one
  assert spans.span_counts(10, 0.9, 1.0) == (9, 1)  # T5 would ask for 9 spans among 1 kept token
  for raw_len in range(2, 400):
    num_noise, num_spans = spans.span_counts(raw_len, 0.75, 1.0)
    assert 1 <= num_spans <= min(num_noise, raw_len - num_noise)


@pytest.mark.parametrize("density, mean_span", [(0.05, 3.0), (0.15, 3.0), (0.15, 1.0), (0.3, 3.0),
                                                (0.5, 1.0), (0.5, 3.0), (0.9, 1.0), (0.95, 8.0)])
def test_every_inputs_len_is_met_exactly_by_the_longest_raw_row(density, mean_span):
  rng = np.random.default_rng(0)
  for inputs_len in range(8, 2049):
    r = spans.recipe(inputs_len, density, mean_span)
    assert r.inputs_len == inputs_len == r.raw_len - r.num_noise + r.num_spans + 1
    assert r.targets_len == r.num_noise + r.num_spans + 1
    assert 1 <= r.num_spans <= min(r.num_noise, r.raw_len - r.num_noise)
    assert spans.raw_length(inputs_len, density, mean_span) == r.raw_len
    mask_L = spans.noise_mask(r.raw_len, r.num_noise, r.num_spans, rng)
    inputs, targets = spans.corrupt(np.full(r.raw_len, 7), mask_L, VOCAB + np.arange(r.num_spans), EOS)
    assert (len(inputs), len(targets)) == (inputs_len, r.targets_len)
    exact = spans.lengths_for(r.raw_len, density, mean_span)[0] == inputs_len
    if exact:  # the longest such raw row: one token more makes longer inputs
      assert spans.lengths_for(r.raw_len + 1, density, mean_span)[0] > inputs_len
    else:  # skipped: the recipe of inputs_len + 1 with one span fewer, T5's noise count kept
      assert spans.span_counts(r.raw_len, density, mean_span) == (r.num_noise, r.num_spans + 1)
      assert spans.raw_length(inputs_len + 1, density, mean_span) == r.raw_len


def test_only_the_span_cap_skips_an_inputs_len():
  """With T5's defaults every inputs_len up to 8192 has raw rows of exactly that length; at density 0.9
  and mean 1 (one kept token between spans) the cap makes the inputs jump by two, and recipe fills in."""
  def skipped(density, mean_span, top=8192):
    reached, raw_len = set(), 2
    while (inputs_len := spans.lengths_for(raw_len, density, mean_span)[0]) <= top:
      reached.add(inputs_len)
      raw_len += 1
    return sorted(set(range(spans.MIN_INPUTS_LEN, top + 1)) - reached)

  for density, mean_span in [(0.01, 3.0), (0.15, 3.0), (0.15, 1.0), (0.5, 3.0), (0.3, 64.0)]:
    assert not skipped(density, mean_span)
  gaps = skipped(0.9, 1.0)
  assert len(gaps) > 1000
  assert all(spans.recipe(n, 0.9, 1.0).inputs_len == n for n in gaps)


def test_inputs_shorter_than_a_token_a_sentinel_and_eos_are_refused():
  assert spans.recipe(spans.MIN_INPUTS_LEN).inputs_len == spans.MIN_INPUTS_LEN
  with pytest.raises(ValueError, match="inputs_len >= 3"):
    spans.recipe(2)
  with pytest.raises(ValueError, match="density"):
    spans.recipe(512, 0.0, 3.0)
  with pytest.raises(ValueError, match="mean noise span"):
    spans.recipe(512, 0.15, 0.5)


@pytest.mark.parametrize("inputs_len, density, mean_span", RECIPES)
def test_spans_alternate_from_non_noise_and_each_has_a_token(inputs_len, density, mean_span):
  r = spans.recipe(inputs_len, density, mean_span)
  rng = np.random.default_rng(1)
  for _ in range(50):
    mask_L = spans.noise_mask(r.raw_len, r.num_noise, r.num_spans, rng)
    lengths, noisy = runs(mask_L)
    assert mask_L.shape == (r.raw_len,) and mask_L.sum() == r.num_noise
    assert not mask_L[0] and mask_L[-1]  # non-noise first, noise last, as in T5
    assert np.all(noisy[1::2]) and not np.any(noisy[0::2]) and len(lengths) == 2 * r.num_spans
    assert np.all(lengths >= 1)


@pytest.mark.parametrize("inputs_len, density, mean_span", RECIPES)
def test_merge_undoes_corrupt(inputs_len, density, mean_span):
  r = spans.recipe(inputs_len, density, mean_span)
  rng = np.random.default_rng(2)
  for tokens_L in raw_rows(50, r.raw_len, seed=inputs_len):
    mask_L = spans.noise_mask(r.raw_len, r.num_noise, r.num_spans, rng)
    inputs, targets = spans.corrupt(tokens_L, mask_L, SENTINELS, EOS)
    assert inputs.dtype == targets.dtype == np.int32
    assert (len(inputs), len(targets)) == (r.inputs_len, r.targets_len)
    assert inputs[-1] == targets[-1] == EOS
    np.testing.assert_array_equal(inputs[:-1][~np.isin(inputs[:-1], SENTINELS)], tokens_L[~mask_L])
    np.testing.assert_array_equal(targets[:-1][~np.isin(targets[:-1], SENTINELS)], tokens_L[mask_L])
    np.testing.assert_array_equal(spans.merge(inputs, targets, SENTINELS, EOS), tokens_L)


def test_merge_refuses_what_corrupt_cannot_make():
  with pytest.raises(ValueError, match="start with a sentinel"):
    spans.merge(np.array([5, SENTINELS[0], EOS]), np.array([7, SENTINELS[0], 8, EOS]), SENTINELS, EOS)
  with pytest.raises(ValueError, match="does not occur in the targets"):
    spans.merge(np.array([5, SENTINELS[1], EOS]), np.array([SENTINELS[0], 8, EOS]), SENTINELS, EOS)


def test_each_sentinel_names_one_gap_on_both_sides_in_order():
  r = spans.recipe(512)
  corruptor = spans.SpanCorruptor(r, SENTINELS, EOS, seed=0, stream=0)
  batch = corruptor(raw_rows(16, r.raw_len), step=3, first_row=0)
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    for side in (inputs, targets):
      np.testing.assert_array_equal(side[np.isin(side, SENTINELS)], SENTINELS[:r.num_spans])
    assert targets[0] == SENTINELS[0]
    assert not np.isin(inputs[0], SENTINELS)  # the row's first token is kept


def test_noise_share_and_mean_span_are_t5s_over_100k_tokens():
  """Measured from what the corruptor made: a target's tokens between sentinels are one noise span.
  0.15 +- 0.01 and 3.0 +- 0.2 allow for the rounding of 141-token rows (21 noise tokens, 7 spans)."""
  r = spans.recipe(128)
  corruptor = spans.SpanCorruptor(r, SENTINELS, EOS, seed=5, stream=1)
  noise, span_lengths, raw = 0, [], 0
  for step in range(24):
    tokens_BxL = raw_rows(32, r.raw_len, seed=step)
    batch = corruptor(tokens_BxL, step, first_row=32 * step)
    for targets in batch["targets"]:
      at = np.flatnonzero(np.isin(targets, SENTINELS))
      span_lengths += list(np.diff(np.append(at, len(targets) - 1)) - 1)
      noise += len(targets) - 1 - len(at)
    raw += tokens_BxL.size
  span_lengths = np.array(span_lengths)
  assert raw >= 100_000
  assert abs(noise / raw - 0.15) <= 0.01
  assert abs(span_lengths.mean() - 3.0) <= 0.2
  assert span_lengths.min() == 1 and span_lengths.max() >= 8  # random lengths, not all 3


def test_a_row_is_the_same_whatever_the_batch_split_and_differs_by_step_and_stream():
  r = spans.recipe(512)
  tokens_BxL = raw_rows(8, r.raw_len)
  corrupt = lambda rows, step=4, first_row=0, stream=0, seed=0: spans.SpanCorruptor(
      r, SENTINELS, EOS, seed=seed, stream=stream)(rows, step, first_row)
  whole, part = corrupt(tokens_BxL), corrupt(tokens_BxL[4:], first_row=4)
  for key in ("inputs", "targets"):
    np.testing.assert_array_equal(whole[key][4:], part[key])
    np.testing.assert_array_equal(corrupt(tokens_BxL)[key], whole[key])  # a resumed run: the same
  rows_alike = lambda other: np.all(other["inputs"] == whole["inputs"], axis=1)
  assert not rows_alike(corrupt(tokens_BxL, step=5)).any()
  assert not rows_alike(corrupt(tokens_BxL, stream=1)).any()
  assert not rows_alike(corrupt(tokens_BxL, seed=1)).any()
  same_tokens = corrupt(tokens_BxL[:1].repeat(8, axis=0))["inputs"]  # row i's place in the batch matters
  assert not np.all(same_tokens[1:] == same_tokens[0], axis=1).any()


def test_corruptor_refuses_rows_of_another_length_and_too_few_sentinels():
  r = spans.recipe(512)
  corruptor = spans.SpanCorruptor(r, SENTINELS, EOS, seed=0, stream=0)
  with pytest.raises(ValueError, match="568"):
    corruptor(raw_rows(2, 512), step=0, first_row=0)
  with pytest.raises(ValueError, match="sentinels"):
    spans.SpanCorruptor(r, SENTINELS[:10], EOS, seed=0, stream=0)
  with pytest.raises(ValueError, match="do not fit"):
    spans.noise_mask(10, 3, 4, np.random.default_rng(0))


def test_a_batch_of_32_t5_rows_takes_well_under_10_ms():
  """Best of several timings: another process on the 2 shared cores slows some, not all. ~2 ms here."""
  r = spans.recipe(512)
  corruptor, tokens_BxL = spans.SpanCorruptor(r, SENTINELS, EOS, seed=0, stream=0), raw_rows(32, r.raw_len)
  best = min(timeit.repeat(lambda: corruptor(tokens_BxL, 0, 0), number=5, repeat=7)) / 5
  assert best < 0.010
