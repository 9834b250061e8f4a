"""Sampling text from a model: temperature and top-k, compiled once as a loop over positions.

This version recomputes the visible window at every position (no KV cache yet); it is for the short
sample printed at the end of training.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(graphdef: nnx.GraphDef, params: nnx.State, prompt: np.ndarray, num_new: int, *,
           context: int, key: jax.Array, temperature: float = 1.0, top_k: int = 0,
           vocab_limit: int | None = None) -> np.ndarray:
  """prompt (P,) ids -> (P + num_new,) ids. temperature 0 is greedy; ids >= vocab_limit never appear."""
  prompt = jnp.asarray(prompt, jnp.int32)
  total = len(prompt) + num_new
  window = min(context, total)

  @jax.jit
  def run(params, key):
    model = nnx.merge(graphdef, params)
    tokens = jnp.zeros((total,), jnp.int32).at[: len(prompt)].set(prompt)

    def fill(i, carry):
      tokens, key = carry
      pos = len(prompt) + i
      start = jnp.clip(pos - window, 0, total - window)
      logits_V = model(jax.lax.dynamic_slice(tokens, (start,), (window,))[None])[0, pos - 1 - start]
      if vocab_limit is not None:
        logits_V = jnp.where(jnp.arange(logits_V.shape[0]) < vocab_limit, logits_V, -jnp.inf)
      if top_k:
        logits_V = jnp.where(logits_V >= jax.lax.top_k(logits_V, top_k)[0][-1], logits_V, -jnp.inf)
      key, sub = jax.random.split(key)
      token = (jnp.argmax(logits_V) if temperature == 0 else
               jax.random.categorical(sub, logits_V / temperature))
      return tokens.at[pos].set(token), key

    return jax.lax.fori_loop(0, num_new, fill, (tokens, key))[0]

  return np.asarray(jax.device_get(run(params, key)))
