"""T5's span corruption: contiguous spans of a row become sentinels in the inputs and are spelled out in
the targets, so an encoder-decoder learns to fill gaps of several tokens at once.

A raw row of `raw_len` tokens is split into `num_spans` noise spans (about `density` of the tokens, spans
of about `mean_span` tokens each) that alternate with as many non-noise spans, non-noise first, as in
T5's `random_spans_noise_mask`. Inputs keep the non-noise tokens and put sentinel j where noise span j
was; targets are sentinel j and noise span j's tokens for every j; both end with EOS. Sentinel j thus
names the same gap on both sides, and `merge` undoes `corrupt` exactly.

The counts follow T5 (`random_spans_helper`): num_noise = round(raw_len * density) and num_spans =
round(num_noise / mean_span), with Python's round, which rounds halves to even like T5's tf.round (so
10 * 0.15 = 1.5 gives 2, 2.5 gives 2). `recipe` inverts them: the longest raw row whose inputs are
exactly `inputs_len` tokens, so a batch needs no padding. Two departures, where T5 would fail silently:
num_spans is at most the non-noise count (T5 would make empty non-noise spans when density is high and
mean_span short), and where that cap makes the input length jump by two from one raw_len to the next,
skipping some inputs_len, `recipe` takes the recipe of inputs_len + 1 with one span fewer, so every
inputs_len >= MIN_INPUTS_LEN is met exactly. (Without the cap the input length grows by 0 or 1 a raw
token, and no inputs_len is skipped: checked for 4..8192 over densities 0.01-0.95 and means 1-64.)

Row i of a batch draws from (seed, stream, step, first_row + i), so a row is corrupted the same on any
mesh, any number of processes, and after a resume.
"""

import dataclasses

import numpy as np

NOISE_DENSITY = 0.15  # T5's share of the raw tokens that become noise
MEAN_NOISE_SPAN_LENGTH = 3.0  # T5's mean noise span, in tokens
MIN_INPUTS_LEN = 3  # one kept token, one sentinel, EOS: the shortest inputs that hide anything
_SPAN_STREAM = 0x7370616e  # "span": separates these draws from every other use of the seed


def _check_rates(density: float, mean_span: float) -> None:
  if not 0 < density < 1:
    raise ValueError(f"the noise density must be in (0, 1), got {density}: a row needs noise and non-noise")
  if mean_span < 1:
    raise ValueError(f"the mean noise span must be >= 1 token, got {mean_span}: every span has a token")


def span_counts(length: int, density: float = NOISE_DENSITY,
                mean_span: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(num_noise, num_spans) for a raw row of `length` tokens, as T5 counts them; at least one token
  stays and one is noise, and no more spans than non-noise tokens (so no span is empty)."""
  _check_rates(density, mean_span)
  if length < 2:
    raise ValueError(f"a row of {length} token(s) cannot hold both a noise and a non-noise span")
  num_noise = min(max(round(length * density), 1), length - 1)
  num_spans = min(max(round(num_noise / mean_span), 1), length - num_noise)
  return num_noise, num_spans


def lengths_for(raw_len: int, density: float = NOISE_DENSITY,
                mean_span: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(inputs_len, targets_len) of a corrupted row of `raw_len` tokens: kept tokens + one sentinel per
  span, and noise tokens + one sentinel per span, each side + 1 for its closing EOS."""
  num_noise, num_spans = span_counts(raw_len, density, mean_span)
  return raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The one source of a corruption's numbers: every row of `raw_len` tokens gets `num_noise` noise
  tokens in `num_spans` spans, and becomes inputs of `inputs_len` and targets of `targets_len` tokens."""
  raw_len: int
  num_noise: int
  num_spans: int
  inputs_len: int
  targets_len: int


def _longest_raw_within(inputs_len: int, density: float, mean_span: float) -> int:
  """The largest raw_len whose inputs are at most `inputs_len` long. lengths_for(L)[0] never decreases
  as L grows (noise and spans each grow by 0 or 1 a step), so a doubling then bisection finds it."""
  fits = lambda raw_len: lengths_for(raw_len, density, mean_span)[0] <= inputs_len
  lo, hi = 2, 4  # lengths_for(2)[0] == MIN_INPUTS_LEN <= inputs_len: lo always fits
  while fits(hi):
    lo, hi = hi, 2 * hi
  while hi - lo > 1:  # fits(lo) and not fits(hi)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def recipe(inputs_len: int, density: float = NOISE_DENSITY,
           mean_span: float = MEAN_NOISE_SPAN_LENGTH) -> Recipe:
  """The longest raw row whose corrupted inputs are exactly `inputs_len` tokens (T5: 512 -> 568 raw
  tokens, 114 targets). Where no raw length gives exactly `inputs_len` (the span cap made the inputs
  jump from inputs_len - 1 to inputs_len + 1), the longest raw row for inputs_len + 1 with one span
  fewer does: the noise share stays T5's, the spans get a little longer."""
  _check_rates(density, mean_span)
  if inputs_len < MIN_INPUTS_LEN:
    raise ValueError(f"inputs of {inputs_len} token(s) cannot hold a kept token, a sentinel and EOS: "
                     f"span corruption needs inputs_len >= {MIN_INPUTS_LEN}")
  raw_len = _longest_raw_within(inputs_len, density, mean_span)
  num_noise, num_spans = span_counts(raw_len, density, mean_span)
  if raw_len - num_noise + num_spans + 1 < inputs_len:  # no raw length gives inputs_len: a jump of two
    raw_len = _longest_raw_within(inputs_len + 1, density, mean_span)
    num_noise, num_spans = span_counts(raw_len, density, mean_span)
    num_spans -= 1  # >= 1: the jump past inputs_len added a span to the one or more there were
  return Recipe(raw_len, num_noise, num_spans, raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1)


def raw_length(inputs_len: int, density: float = NOISE_DENSITY,
               mean_span: float = MEAN_NOISE_SPAN_LENGTH) -> int:
  """The raw row length whose corrupted inputs are exactly `inputs_len` tokens (see `recipe`)."""
  return recipe(inputs_len, density, mean_span).raw_len


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """`num_items` split into `num_segments` positive lengths, uniformly over all such splits (T5's
  `_random_segmentation`): a shuffled 0/1 vector marks the items after the first that begin a segment."""
  begins = np.zeros(num_items + 1, bool)
  begins[1:num_segments] = True
  rng.shuffle(begins[1:num_items])
  begins[[0, num_items]] = True  # the first segment begins at 0; the last ends at num_items
  return np.diff(np.flatnonzero(begins))


def noise_mask(length: int, num_noise: int, num_spans: int, rng: np.random.Generator) -> np.ndarray:
  """A (length,) bool mask of `num_noise` noise tokens in `num_spans` spans, alternating with as many
  non-noise spans: non-noise first and noise last, as T5's `random_spans_noise_mask` lays them."""
  num_nonnoise = length - num_noise
  if not 1 <= num_spans <= min(num_noise, num_nonnoise):
    raise ValueError(f"{num_spans} span(s) of noise do not fit {num_noise} noise and {num_nonnoise} "
                     "non-noise tokens: every noise and non-noise span needs a token")
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), interleaved)


def corrupt(tokens_L: np.ndarray, mask_L: np.ndarray, sentinels: np.ndarray,
            eos: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets): inputs with noise span j replaced by sentinels[j], targets sentinels[j] and span
  j's tokens for each span in order; each ends with EOS. The sentinels must not occur in the tokens."""
  inputs_1xI, targets_1xT = _corrupt_rows(np.asarray(tokens_L)[None], np.asarray(mask_L)[None],
                                          sentinels, eos)
  return inputs_1xI[0], targets_1xT[0]


def _corrupt_rows(tokens_BxL: np.ndarray, mask_BxL: np.ndarray, sentinels: np.ndarray,
                  eos: int) -> tuple[np.ndarray, np.ndarray]:
  """`corrupt` for rows with equal noise and span counts, at once. Each position offers a pair (its span's
  sentinel, its token); inputs take the sentinel at a span's start and the token off noise, targets the
  sentinel at a span's start and the token on noise, in order: a boolean gather, no loop."""
  tokens_BxL, mask_BxL = np.asarray(tokens_BxL, np.int32), np.asarray(mask_BxL, bool)
  start_BxL = mask_BxL.copy()
  start_BxL[:, 1:] &= ~mask_BxL[:, :-1]
  spans_BxL = np.cumsum(start_BxL, axis=1)  # the spans begun so far: span j's tokens see j + 1
  num_spans, num_noise = spans_BxL[:, -1], mask_BxL.sum(axis=1)
  if np.any(num_spans != num_spans[0]) or np.any(num_noise != num_noise[0]):
    raise ValueError("rows corrupted together need the same numbers of noise tokens and spans")
  if num_spans[0] > len(sentinels):
    raise ValueError(f"{num_spans[0]} noise spans but only {len(sentinels)} sentinels")
  sentinel_BxL = np.asarray(sentinels, np.int32)[np.maximum(spans_BxL - 1, 0)]
  pairs_BxLx2 = np.stack([sentinel_BxL, tokens_BxL], axis=-1)
  b = len(tokens_BxL)  # every row keeps as many of its pairs' halves: the reshapes are exact
  inputs_BxI = pairs_BxLx2[np.stack([start_BxL, ~mask_BxL], axis=-1)].reshape(b, -1)
  targets_BxT = pairs_BxLx2[np.stack([start_BxL, mask_BxL], axis=-1)].reshape(b, -1)
  eos_Bx1 = np.full((b, 1), eos, np.int32)
  return np.concatenate([inputs_BxI, eos_Bx1], axis=1), np.concatenate([targets_BxT, eos_Bx1], axis=1)


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """The indices [s, s + n) for each (s, n), end to end: a gather of many slices with no Python loop."""
  ends = np.cumsum(lengths)
  return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def merge(inputs: np.ndarray, targets: np.ndarray, sentinels: np.ndarray, eos: int) -> np.ndarray:
  """The raw tokens `corrupt` started from: each sentinel of the inputs replaced by the tokens after the
  same sentinel in the targets. Proves that corruption loses nothing."""
  inputs, targets = np.asarray(inputs)[:-1], np.asarray(targets)[:-1]  # (each ends with EOS)
  if len(targets) and not np.isin(targets[0], sentinels):
    raise ValueError("the targets must start with a sentinel: tokens before it belong to no gap")
  at_target = np.flatnonzero(np.isin(targets, sentinels))
  heads = targets[at_target]
  piece_lengths = np.diff(np.append(at_target, len(targets))) - 1  # tokens after each target sentinel
  is_sentinel = np.isin(inputs, sentinels)
  if not np.all(np.isin(inputs[is_sentinel], heads)):
    raise ValueError("a sentinel of the inputs does not occur in the targets")
  order = np.argsort(heads, kind="stable")
  piece = order[np.searchsorted(heads, inputs[is_sentinel], sorter=order)]  # each input gap's targets
  starts, lengths = np.arange(len(inputs)), np.ones(len(inputs), np.int64)
  starts[is_sentinel] = len(inputs) + at_target[piece] + 1  # into the targets, after their sentinel
  lengths[is_sentinel] = piece_lengths[piece]
  return np.concatenate([inputs, targets])[_concat_ranges(starts, lengths)].astype(np.int32)


class SpanCorruptor:
  """Raw rows (B, recipe.raw_len) -> a span-corruption batch: "inputs" (B, recipe.inputs_len) and
  "targets" (B, recipe.targets_len), int32, each row's spans drawn from its place in the global batch."""

  def __init__(self, recipe: Recipe, sentinels: np.ndarray, eos: int, seed: int, stream: int):
    if len(sentinels) < recipe.num_spans:
      raise ValueError(f"the recipe makes {recipe.num_spans} spans a row but {len(sentinels)} sentinels "
                       "were given: each span needs its own")
    self.recipe, self.sentinels, self.eos = recipe, np.asarray(sentinels, np.int32), eos
    self.seed, self.stream = seed, stream

  def __call__(self, tokens_BxL: np.ndarray, step: int, first_row: int) -> dict:
    r = self.recipe
    tokens_BxL = np.asarray(tokens_BxL, np.int32)
    if tokens_BxL.ndim != 2 or tokens_BxL.shape[1] != r.raw_len:
      raise ValueError(f"rows of shape {tokens_BxL.shape}, but the recipe corrupts (B, {r.raw_len}) "
                       f"rows into {r.inputs_len} inputs")
    mask_BxL = np.empty(tokens_BxL.shape, bool)
    for i in range(len(tokens_BxL)):
      rng = np.random.default_rng([self.seed, _SPAN_STREAM, self.stream, step, first_row + i])
      mask_BxL[i] = noise_mask(r.raw_len, r.num_noise, r.num_spans, rng)
    inputs_BxI, targets_BxT = _corrupt_rows(tokens_BxL, mask_BxL, self.sentinels, self.eos)
    return {"inputs": inputs_BxI, "targets": targets_BxT}
