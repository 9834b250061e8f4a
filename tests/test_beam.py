"""Beam search on toy models whose every sequence can be scored by hand: it finds the best of all sequences
when its beams can hold them all, is greedy with one beam, beats greedy where greedy is misled, keeps each
state row with its hypothesis, and never produces a forbidden token or a NaN."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.beam import beam_search, length_penalty

V, EOS, START = 5, 0, 4  # the toy vocabulary: EOS is 0; the start token 4 can also be generated


@functools.partial(jax.jit, static_argnums=0, static_argnames=("batch", "beams", "max_len", "eos", "start"))
def search(step_fn, state, alpha, *, batch, beams, max_len, eos=EOS, start=START):
  return beam_search(step_fn, state, batch=batch, beams=beams, max_len=max_len, eos=eos, start=start,
                     alpha=alpha)


def chain_step(tokens_N, index, state):
  """A second-order Markov chain, one table per batch item: the token before `tokens_N` is read from the
  state's prefix, so a state row that did not follow its hypothesis gives the wrong log-probabilities."""
  prefix_NxL, table_NxVxVxV = state["prefix"], state["table"]
  rows = jnp.arange(tokens_N.shape[0])
  before_N = prefix_NxL[rows, jnp.maximum(index - 1, 0)]  # (the prefix starts filled with START)
  logits_NxV = table_NxVxVxV[rows, before_N, tokens_N]
  if "allowed" in state:  # forbidden tokens: -inf, or the most negative float for the last one forbidden
    huge = jnp.where(jnp.arange(logits_NxV.shape[1]) == 3, jnp.finfo(jnp.float32).min, -jnp.inf)
    logits_NxV = jnp.where(state["allowed"], logits_NxV, huge)
  new = {**state, "prefix": prefix_NxL.at[rows, index].set(tokens_N)}
  if "count" in state:
    new["count"] = state["count"] + 1
  return jax.nn.log_softmax(logits_NxV), new


SEEN = {}  # what recording_step saw: {index: the prefixes (N, L) it wrote}


def recording_step(tokens_N, index, state):
  """chain_step, and a copy of each step's prefixes on the host, to see the rows and count the steps."""
  logp, new = chain_step(tokens_N, index, state)
  jax.debug.callback(lambda i, p: SEEN.__setitem__(int(i), np.asarray(p)), index, new["prefix"])
  return logp, new


def chain_state(tables_BxVxVxV, beams, max_len, start=START, **extra):
  """Per-item tables repeated per beam (as an encoder's outputs would be), and prefixes of start tokens."""
  n = tables_BxVxVxV.shape[0] * beams
  return {"prefix": jnp.full((n, max_len), start, jnp.int32),
          "table": jnp.repeat(jnp.asarray(tables_BxVxVxV, jnp.float32), beams, axis=0), **extra}


def random_tables(seed, batch, eos_bias=0.0):
  tables = np.random.default_rng(seed).normal(size=(batch, V, V, V)) * 1.5
  tables[..., EOS] += eos_bias
  return tables


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def sequence_logp(table_VxVxV, tokens, start=START):
  """The chain's log-probability of `tokens`, computed independently of beam_search."""
  before, last, total = start, start, 0.0
  for t in tokens:
    total += log_softmax(table_VxVxV[before, last])[t]
    before, last = last, t
  return total


def all_sequences(max_len):
  """Every sequence the search can return: up to the first EOS, or max_len tokens without one."""
  for length in range(1, max_len + 1):
    for body in itertools.product(range(1, V), repeat=length - 1):
      yield body + (EOS,)
      if length == max_len:
        yield from (body + (t,) for t in range(1, V))


def trimmed(tokens, length):
  return tuple(int(t) for t in np.asarray(tokens)[:int(length)])


def check_filled(tokens_L, length):
  """Positions after a hypothesis's end hold EOS, and EOS appears only as its last token."""
  tokens_L, length = np.asarray(tokens_L), int(length)
  assert np.all(tokens_L[length:] == EOS)
  assert not np.any(tokens_L[:length - 1] == EOS)


def test_length_penalty_is_t5x_brevity_penalty():
  np.testing.assert_allclose(length_penalty(7, 0.6), (12 / 6) ** 0.6, rtol=1e-6)
  np.testing.assert_allclose(length_penalty(jnp.arange(1, 4), 0.0), 1.0)


@pytest.mark.parametrize("beams", [3, 80])
def test_enough_beams_find_the_best_of_all_sequences(beams):
  """80 beams hold every candidate of every step before the last (16 prefixes x 5 tokens), so the search
  is exact: its K best are the K best of a brute-force enumeration. Fewer beams still return a real
  sequence, scored right, and never better than the best."""
  max_len, batch = 4, 3
  sequences = list(all_sequences(max_len))
  for seed, alpha in itertools.product([0, 1], [0.0, 0.6, 2.0, -0.5]):
    tables = random_tables(seed, batch, eos_bias=0.5)
    out = search(chain_step, chain_state(tables, beams, max_len), alpha, batch=batch, beams=beams,
                 max_len=max_len)
    for b in range(batch):
      scored = {s: sequence_logp(tables[b], s) / float(length_penalty(len(s), alpha)) for s in sequences}
      best = sorted(scored.values(), reverse=True)
      mine = trimmed(out.tokens[b], out.lengths[b])
      check_filled(out.tokens[b], out.lengths[b])
      np.testing.assert_allclose(out.scores[b], scored[mine], rtol=1e-5)
      np.testing.assert_allclose(out.logprobs[b], sequence_logp(tables[b], mine), rtol=1e-5)
      for tokens, length, logp in zip(out.all_tokens[b], out.all_lengths[b], out.all_logprobs[b]):
        np.testing.assert_allclose(logp, sequence_logp(tables[b], trimmed(tokens, length)), rtol=1e-5)
      assert float(out.scores[b]) <= best[0] + 1e-5
      if beams == 80:
        np.testing.assert_allclose(out.all_scores[b], best[:beams], rtol=1e-5)
        assert len({trimmed(t, n) for t, n in zip(out.all_tokens[b], out.all_lengths[b])}) == beams


def greedy(table_VxVxV, max_len):
  before, last, out = START, START, []
  while len(out) < max_len and (not out or out[-1] != EOS):
    out.append(int(np.argmax(table_VxVxV[before, last])))
    before, last = last, out[-1]
  return tuple(out)


def test_one_beam_without_length_penalty_is_greedy_decoding():
  max_len, batch = 6, 8
  tables = random_tables(2, batch, eos_bias=0.8)
  out = search(chain_step, chain_state(tables, 1, max_len), 0.0, batch=batch, beams=1, max_len=max_len)
  expected = [greedy(tables[b], max_len) for b in range(batch)]
  assert len({len(e) for e in expected}) > 1  # (some stop at EOS, some run to max_len)
  for b in range(batch):
    assert trimmed(out.tokens[b], out.lengths[b]) == expected[b]
    check_filled(out.tokens[b], out.lengths[b])
    np.testing.assert_allclose(out.logprobs[b], sequence_logp(tables[b], expected[b]), rtol=1e-5)


def first_order(rows: dict, v=6):
  """A chain over v tokens where only the last token matters, from {token: {next: probability}}; the
  next tokens not named share almost nothing. As (1, v, v, v) tables for chain_state."""
  probs = np.full((v, v), 1e-4)
  for token, nexts in rows.items():
    for t, p in nexts.items():
      probs[token, t] = p
  logp = np.log(probs / probs.sum(1, keepdims=True))
  return logp, np.broadcast_to(logp, (1, v, v, v))


FIRST_ORDER_START = 5


def first_order_search(tables, beams, max_len, alpha, step_fn=chain_step):
  return search(step_fn, chain_state(tables, beams, max_len, start=FIRST_ORDER_START), alpha, batch=1,
                beams=beams, max_len=max_len, start=FIRST_ORDER_START)


def test_two_beams_find_the_likelier_sequence_that_greedy_misses():
  """After start, token 1 (0.55) beats token 2 (0.45), but 1 leads to EOS at 0.3 and 2 to EOS at 0.95.
  Either way the search stops after the 2 steps that settle it, not at max_len."""
  s = FIRST_ORDER_START
  logp, tables = first_order({s: {1: 0.55, 2: 0.45}, 1: {EOS: 0.3, 2: 0.7 / 3, 3: 0.7 / 3, 4: 0.7 / 3},
                              2: {EOS: 0.95}, 3: {EOS: 0.9}, 4: {EOS: 0.9}})
  found = {}
  for beams in (1, 2):
    SEEN.clear()
    out = first_order_search(tables, beams, 5, 0.0, step_fn=recording_step)
    jax.effects_barrier()
    assert sorted(SEEN) == [0, 1]
    found[beams] = trimmed(out.tokens[0], out.lengths[0]), float(out.logprobs[0])
  assert found[1][0] == (1, EOS)
  np.testing.assert_allclose(found[1][1], logp[s, 1] + logp[1, EOS], rtol=1e-5)
  assert found[2][0] == (2, EOS)
  np.testing.assert_allclose(found[2][1], logp[s, 2] + logp[2, EOS], rtol=1e-5)
  assert found[2][1] > found[1][1]


def test_early_stop_never_cuts_off_a_hypothesis_that_can_still_win():
  """Cases where a bound on the wrong side stops too soon. alpha = 2: after step 1, (4, EOS) and (1, EOS)
  are finished and (1, 2) is alive with a lower logp, but its continuation 2, 2, ... (0.999 each) scores
  best at max_len = 10. alpha = -1 (short is good): after step 1, (EOS) and (2, EOS) are finished and
  (1, 3) is alive; t5x's bound (divide by the penalty at max_len) says it cannot beat (2, EOS), but its
  (1, 3, EOS) does: the right bound for alpha < 0 is the penalty of the next length."""
  s = FIRST_ORDER_START
  _, long_wins = first_order({s: {1: 0.5, 4: 0.45, EOS: 0.05}, 1: {EOS: 0.6, 2: 0.4}, 2: {2: 0.999},
                              4: {EOS: 0.9}})
  out = first_order_search(long_wins, 2, 10, 2.0)
  assert trimmed(out.tokens[0], out.lengths[0]) == (1,) + (2,) * 9
  _, short_wins = first_order({s: {EOS: 0.5, 1: 0.3, 2: 0.15}, 1: {EOS: 0.1, 3: 0.9}, 2: {EOS: 0.9, 3: 0.1},
                               3: {EOS: 0.99}, 4: {EOS: 0.99}})
  out = first_order_search(short_wins, 2, 10, -1.0)
  assert [trimmed(t, n) for t, n in zip(out.all_tokens[0], out.all_lengths[0])] == [(EOS,), (1, 3, EOS)]


def test_state_rows_follow_their_hypotheses():
  """Every step, each row's prefix (as the step function writes it) extends a prefix that a row of the
  same batch item held the step before, and every prefix of the K finished hypotheses was held."""
  max_len, batch, beams = 5, 2, 3
  SEEN.clear()
  tables = random_tables(3, batch)
  out = search(recording_step, chain_state(tables, beams, max_len), 0.6, batch=batch, beams=beams,
               max_len=max_len)
  jax.effects_barrier()
  seen = dict(SEEN)
  for b in range(batch):
    rows = {i: {tuple(r[:i + 1]) for r in p[b * beams:(b + 1) * beams]} for i, p in seen.items()}
    assert all(r[0] == START for r in rows[0])
    for i in range(1, len(seen)):
      assert all(r[:-1] in rows[i - 1] for r in rows[i])
    for tokens, length in zip(out.all_tokens[b], out.all_lengths[b]):
      sequence = (START,) + trimmed(tokens, length)
      for i in range(int(length)):  # (the last token, EOS or the max_len-th, is never fed)
        assert sequence[:i + 1] in rows[i]


def test_forbidden_tokens_never_appear_and_no_nan_with_mixed_state_leaves():
  """Item 0 forbids 1 and 2 (-inf) and 3 (the most negative float), item 1 forbids EOS, item 2 nothing;
  the state also has bool, int8, and (in a tuple) bfloat16 and uint8 leaves, carried through the loop."""
  max_len, batch, beams = 5, 3, 4
  allowed = np.ones((batch, V), bool)
  allowed[0, [1, 2, 3]] = False
  allowed[1, EOS] = False
  extra = {"allowed": jnp.repeat(jnp.asarray(allowed), beams, axis=0),
           "count": jnp.zeros(batch * beams, jnp.int8),
           "pair": (jnp.ones((batch * beams, 2, 3), jnp.bfloat16), jnp.zeros((batch * beams, 1), jnp.uint8))}
  for alpha in (0.6, -0.5):
    out = search(chain_step, chain_state(random_tables(4, batch), beams, max_len, **extra), alpha,
                 batch=batch, beams=beams, max_len=max_len)
    for field in ("scores", "logprobs", "all_scores", "all_logprobs"):
      assert not np.any(np.isnan(np.asarray(getattr(out, field))))
    assert np.all(np.isfinite(out.scores)) and np.all(np.asarray(out.scores) > -1e30)
    real = np.asarray(out.all_scores) > -1e30  # (the rest are dead beams of forbidden tokens)
    tokens_BxKxL, lengths_BxK = np.asarray(out.all_tokens), np.asarray(out.all_lengths)
    for b, k in zip(*np.nonzero(real)):
      assert all(allowed[b, t] for t in tokens_BxKxL[b, k, :lengths_BxK[b, k]])
    assert int(out.lengths[1]) == max_len and not np.any(np.asarray(out.tokens[1]) == EOS)


def test_state_leaves_without_the_beam_axis_are_refused():
  state = chain_state(random_tables(0, 2), 3, 4)
  state["table"] = state["table"][:2]
  with pytest.raises(ValueError, match="leading axis batch"):
    beam_search(chain_step, state, batch=2, beams=3, max_len=4, eos=EOS, start=START)
