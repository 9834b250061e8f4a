"""The decoder-only transformer (GPT): causal self-attention over the shared trunk, with a KV cache."""

import jax
import jax.numpy as jnp

from jaxlm.models.layers import Mask, attention_mask
from jaxlm.models.transformer import ModelConfig, Trunk, default_positions


class GPT(Trunk):
  """Causal LM: token ids (B, T) -> next-token logits (B, T, V)."""

  family = "decoder"

  def __call__(self, tokens_BxT: jax.Array, dropout_key: jax.Array | None = None, *,
               segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
               kv_cache: list | None = None):
    """Logits (float32) for every position; position t sees tokens 0..t only.

    A packed row holds several documents: `segment_ids_BxT` numbers them (a position sees only its
    own document) and `positions_BxT` counts from 0 in each, so a document gives the same logits
    packed as alone.

    With `kv_cache` (a (keys, values) pair per layer, each (B, H, S, K), from `init_cache`), the tokens
    are the next ones of each row at `positions_BxT`; they are added to the cache, attend to every
    cached position up to their own, and (logits, updated cache) is returned (generate.py).
    """
    t = tokens_BxT.shape[1]
    if positions_BxT is None:
      positions_BxT = default_positions(t)
    logits_BxTxV, caches = self.forward(tokens_BxT, causal_mask(t, segment_ids_BxT, positions_BxT, kv_cache),
                                        positions_BxT, dropout_key, kv_cache)
    return logits_BxTxV if kv_cache is None else (logits_BxTxV, caches)


def causal_mask(t: int, segment_ids_BxT, positions_BxT, kv_cache) -> Mask:
  """Causal self-attention within each document; with a KV cache, every cached position up to the
  query's own."""
  if kv_cache is None:
    return Mask(attention_mask(t, segment_ids_BxT, causal=True), segment_ids_BxT)
  s = kv_cache[0][0].shape[2]
  return Mask(jnp.arange(s)[None, None, None, :] <= positions_BxT[:, None, :, None])


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list[tuple[jax.Array, jax.Array]]:
  """An empty KV cache for `batch` rows of up to `length` positions: (keys, values) per layer, each of
  the model's key/value heads (fewer than its heads with grouped-query attention)."""
  head_dim = cfg.width // cfg.num_heads
  shape = (batch, cfg.kv_heads, length, head_dim)
  return [(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)) for _ in range(cfg.num_layers)]
