"""Generation past the context the plain way: every new token from a full forward of the row's window,
which slides by the rule of generate.py (kept_after_slide) once it is full. The reference that
test_sliding.py compares jaxlm's cached, re-prefilling generation with, and the recompute that
benchmarks/sliding.py times it against."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.generate import choose, kept_after_slide, limit_vocab


def window_start(length: int, start: int, max_seq_len: int) -> int:
  """Where the window starts for the next token of a row of `length` tokens whose window started at
  `start`: it stays until it holds more than max_seq_len tokens, then keeps the newest kept_after_slide."""
  return length - kept_after_slide(max_seq_len) if length - start > max_seq_len else start


@functools.partial(jax.jit, static_argnums=(0, 1))
def last_logits(graphdef, vocab_limit: int, params, tokens_1xT):
  """The next-token logits after a window (compiled once per window length, kept across calls)."""
  return limit_vocab(nnx.merge(graphdef, params)(tokens_1xT), vocab_limit)[0, -1]


def sliding_generate(graphdef, params, prompt, max_new_tokens: int, max_seq_len: int, *, eos_id: int, vocab_limit: int,
                     temperature=0.0, top_k=0, top_p=1.0, seed=0, sample_id=0, crop_every_token=False):
  """A row's new tokens. `crop_every_token`: nanoGPT's rule instead (the newest max_seq_len tokens at
  every step), for timing only."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), sample_id)
  settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  ids, start = list(prompt), 0
  for j in range(max_new_tokens):
    start = max(0, len(ids) - max_seq_len) if crop_every_token else window_start(len(ids), start, max_seq_len)
    logits_V = last_logits(graphdef, vocab_limit, params, jnp.asarray([ids[start:]], jnp.int32))
    token = int(choose(logits_V[None], jax.random.fold_in(key, j)[None], *settings)[0])
    if token == eos_id:
      break
    ids.append(token)
  return np.asarray(ids[len(prompt):], np.int32)
