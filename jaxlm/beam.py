"""Beam search over any model that gives next-token log-probabilities, in one compiled loop.

The model is a step function: given each beam's last token and its position, it returns the log-probabilities
of the next token and its new state (KV caches, an encoder's keys and values repeated per beam, ...). The
search keeps K alive hypotheses per batch item and reorders the state rows after their parent beams every
step, so the step function never needs to know about beams. The whole search is one `lax.while_loop`:
compiled once per shape (the caller jits it), with the length penalty's alpha traced.

Scores use t5x's brevity penalty: logp / ((5 + length) / 6) ** alpha, where length counts the generated
tokens including the EOS. As in t5x, the K alive hypotheses are the best K non-EOS ones among the top 2K
candidates (K of them could end in EOS: 2K leaves K alive whatever happens), and a batch item stops early
once the best score its alive hypotheses could still reach cannot beat its K finished ones. Unlike t5x,
and as in fairseq and Hugging Face, a candidate ending in EOS finishes only if it ranks among the top K
candidates of its step: those ranked K..2K-1 would not have been kept as beams, and letting them finish
is what makes t5x with K=1 differ from greedy decoding. With K=1 and alpha=0 this search is greedy.

Rows of the state and of `tokens_N` are n = b * beams + k (beam k of batch item b). Log-probabilities of
-inf (forbidden tokens) are fine: such hypotheses score -inf and never win while a finite one exists.
"""

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


class BeamResult(NamedTuple):
  """The best hypothesis of each batch item, and its K best (best first), all of max_len tokens.

  Tokens are the generated ones only (no start token), ending with EOS where the hypothesis finished;
  positions after its end hold EOS. Lengths count the generated tokens, the EOS included when present.
  Scores are length-penalised; logprobs are the plain sums of the tokens' log-probabilities.
  """

  tokens: jax.Array  # int32 (B, L)
  lengths: jax.Array  # int32 (B,)
  scores: jax.Array  # float32 (B,)
  logprobs: jax.Array  # float32 (B,)
  all_tokens: jax.Array  # int32 (B, K, L)
  all_lengths: jax.Array  # int32 (B, K)
  all_scores: jax.Array  # float32 (B, K)
  all_logprobs: jax.Array  # float32 (B, K)


def length_penalty(length, alpha):
  """t5x's brevity penalty ((5 + length) / 6) ** alpha: a score is logp divided by it, so alpha > 0
  favours longer hypotheses (which a plain sum of log-probabilities always penalises)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** jnp.asarray(alpha, jnp.float32)


def beam_search(step_fn: StepFn, state, *, batch: int, beams: int, max_len: int, eos: int, start: int,
                alpha: float = 0.6, return_state: bool = False):
  """Beam search of `beams` hypotheses per batch item, of at most `max_len` generated tokens.

  `step_fn(tokens_N, index, state) -> (logp_NxV, state)`: N = batch * beams; `tokens_N` are the tokens
  just chosen (`start` at index 0) and `index` their position (0 for start, so indices 0..max_len-1 are
  seen). Every leaf of `state` has leading axis N; it is reordered by parent beam after every step.
  The log-probabilities must be normalised (<= 0): the early stop relies on scores only going down.
  An alive hypothesis that reaches max_len without EOS finishes there, so every item gets an answer.
  Traceable in `jax.jit` (batch, beams, max_len, eos and start static; alpha may be traced).
  Returns the BeamResult, or (BeamResult, the final state) with `return_state` (e.g. flags it carries).
  """
  n = _check(state, batch, beams, max_len)
  k2 = 2 * beams  # (at most K of the 2K candidates end in EOS, so K non-EOS ones always remain)
  alpha = jnp.asarray(alpha, jnp.float32)
  first_BxK = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)  # one live beam: no K duplicates
  carry = {
      "i": jnp.int32(0), "done_B": jnp.zeros(batch, bool), "last_N": jnp.full(n, start, jnp.int32),
      "alive_BxKxL": jnp.full((batch, beams, max_len), eos, jnp.int32),
      "alive_logp_BxK": jnp.broadcast_to(first_BxK, (batch, beams)).astype(jnp.float32),
      "fin_BxKxL": jnp.full((batch, beams, max_len), eos, jnp.int32),
      "fin_logp_BxK": jnp.full((batch, beams), -jnp.inf, jnp.float32),
      "fin_scores_BxK": jnp.full((batch, beams), -jnp.inf, jnp.float32),
      "fin_lengths_BxK": jnp.zeros((batch, beams), jnp.int32),
      "state": state,
  }

  def running(c):
    return (c["i"] < max_len) & ~jnp.all(c["done_B"])

  def step(c):
    logp_NxV, new_state = step_fn(c["last_N"], c["i"], c["state"])
    if logp_NxV.ndim != 2 or logp_NxV.shape[0] != n or logp_NxV.shape[1] < 2:
      raise ValueError(f"step_fn must return log-probabilities of shape (N={n}, V >= 2), got "
                       f"{logp_NxV.shape}")
    cand = _candidates(c, logp_NxV.astype(jnp.float32), k2, eos, max_len, alpha)
    c = {**c, **_keep_finished(c, cand, beams)}
    alive, parents_N = _keep_alive(cand, beams, eos)
    c = {**c, **alive, "state": jax.tree.map(lambda x: x[parents_N], new_state), "i": c["i"] + 1}
    return {**c, "done_B": _done(c, max_len, alpha)}

  c = jax.lax.while_loop(running, step, carry)
  result = BeamResult(c["fin_BxKxL"][:, 0], c["fin_lengths_BxK"][:, 0], c["fin_scores_BxK"][:, 0],
                    c["fin_logp_BxK"][:, 0], c["fin_BxKxL"], c["fin_lengths_BxK"], c["fin_scores_BxK"],
                    c["fin_logp_BxK"])
  return (result, c["state"]) if return_state else result


def _check(state, batch: int, beams: int, max_len: int) -> int:
  """N = batch * beams, once the static arguments and the state's leading axes are known to agree."""
  for name, value in (("batch", batch), ("beams", beams), ("max_len", max_len)):
    try:
      ok = operator.index(value) >= 1
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f"{name} must be a positive int (static under jit), got {value!r}")
  n = operator.index(batch) * operator.index(beams)
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
      raise ValueError(f"state leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}: every leaf "
                       f"needs leading axis batch * beams = {n} (repeat per-input values per beam)")
  return n


def _candidates(c, logp_NxV: jax.Array, k2: int, eos: int, max_len: int, alpha) -> dict:
  """The top 2K one-token extensions of each item's alive hypotheses (best first), and which finish.

  -inf log-probabilities stay -inf through the sums and the top-k (no subtraction, so no NaN).
  """
  b, k, _ = c["alive_BxKxL"].shape
  v = logp_NxV.shape[-1]
  total_BxKV = (c["alive_logp_BxK"][:, :, None] + logp_NxV.reshape(b, k, v)).reshape(b, k * v)
  logp_Bx2K, flat_Bx2K = jax.lax.top_k(total_BxKV, k2)
  parent_Bx2K, token_Bx2K = flat_Bx2K // v, (flat_Bx2K % v).astype(jnp.int32)
  prefix_Bx2KxL = jnp.take_along_axis(c["alive_BxKxL"], parent_Bx2K[:, :, None], axis=1)
  at_i_L = jnp.arange(max_len) == c["i"]
  seqs_Bx2KxL = jnp.where(at_i_L, token_Bx2K[:, :, None], prefix_Bx2KxL)
  length = c["i"] + 1
  ends_Bx2K = (token_Bx2K == eos) | (length >= max_len)  # (at max_len every hypothesis finishes)
  finishes_Bx2K = ends_Bx2K & (jnp.arange(k2) < k)  # (only those that would have ranked as beams)
  return {"logp_Bx2K": logp_Bx2K, "parent_Bx2K": parent_Bx2K, "token_Bx2K": token_Bx2K,
          "seqs_Bx2KxL": seqs_Bx2KxL, "finishes_Bx2K": finishes_Bx2K,
          "scores_Bx2K": logp_Bx2K / length_penalty(length, alpha), "length": length}


def _keep_finished(c, cand: dict, beams: int) -> dict:
  """The best K by score of the old finished hypotheses and the candidates that finish now."""
  new_scores_Bx2K = jnp.where(cand["finishes_Bx2K"], cand["scores_Bx2K"], -jnp.inf)
  scores_Bx3K = jnp.concatenate([c["fin_scores_BxK"], new_scores_Bx2K], axis=1)
  scores_BxK, pick_BxK = jax.lax.top_k(scores_Bx3K, beams)  # (ties keep the older: they come first)
  lengths_Bx2K = jnp.broadcast_to(cand["length"], new_scores_Bx2K.shape).astype(jnp.int32)

  def pick(old, new):
    both = jnp.concatenate([old, new], axis=1)
    index = pick_BxK.reshape(pick_BxK.shape + (1,) * (both.ndim - 2))
    return jnp.take_along_axis(both, index, axis=1)

  return {"fin_scores_BxK": scores_BxK,
          "fin_BxKxL": pick(c["fin_BxKxL"], cand["seqs_Bx2KxL"]),
          "fin_logp_BxK": pick(c["fin_logp_BxK"], cand["logp_Bx2K"]),
          "fin_lengths_BxK": pick(c["fin_lengths_BxK"], lengths_Bx2K)}


def _keep_alive(cand: dict, beams: int, eos: int) -> tuple[dict, jax.Array]:
  """The best K candidates not ending in EOS, and the state row of each one's parent (n = b * K + k)."""
  logp_Bx2K = jnp.where(cand["token_Bx2K"] == eos, -jnp.inf, cand["logp_Bx2K"])
  logp_BxK, pick_BxK = jax.lax.top_k(logp_Bx2K, beams)
  seqs_BxKxL = jnp.take_along_axis(cand["seqs_Bx2KxL"], pick_BxK[:, :, None], axis=1)
  token_BxK = jnp.take_along_axis(cand["token_Bx2K"], pick_BxK, axis=1)
  parent_BxK = jnp.take_along_axis(cand["parent_Bx2K"], pick_BxK, axis=1)
  b = logp_BxK.shape[0]
  parents_N = (jnp.arange(b)[:, None] * beams + parent_BxK).reshape(-1)
  alive = {"alive_BxKxL": seqs_BxKxL, "alive_logp_BxK": logp_BxK, "last_N": token_BxK.reshape(-1)}
  return alive, parents_N


def _done(c, max_len: int, alpha) -> jax.Array:
  """Whether each item's K finished hypotheses already beat anything its alive ones could become.

  An alive hypothesis of logp (<= 0, only going down) finishes at a length in [i + 1, max_len]; the
  penalty is monotonic in length, so its best possible score is logp over the larger penalty of the
  two ends: max_len when alpha >= 0 (t5x's bound), the next length when alpha < 0. Empty finished slots
  score -inf, so an item is only done early when it has K finished or no finite alive hypothesis left.
  """
  i = c["i"]  # tokens generated so far, by every alive hypothesis
  best_penalty = jnp.maximum(length_penalty(i + 1, alpha), length_penalty(max_len, alpha))
  best_alive_B = jnp.max(c["alive_logp_BxK"], axis=1) / best_penalty
  worst_finished_B = jnp.min(c["fin_scores_BxK"], axis=1)
  return best_alive_B <= worst_finished_B
