"""The decoder-only transformer (GPT): embeddings, a stack of pre-norm blocks, a final norm, logits."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.layers import Block, Norm, attention_mask, dropout, matmul, param
from jaxlm.parallel import constrain

INIT_STD = 0.02  # GPT-2's init


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyperparameters: hashable, so it can live in the NNX graph definition."""

  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  width: int = 128
  mlp_width: int = 512
  max_seq_len: int = 256
  position: str = "rope"
  rope_base: float = 10000.0
  norm: str = "rmsnorm"
  mlp: str = "gelu"
  tie_embeddings: bool = True
  use_bias: bool = False
  dropout: float = 0.0
  dtype: str = "float32"

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "ModelConfig":
    """From the config's `model` section; vocab_size 0 there means the tokenizer's (given here)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_config.to_dict().items() if k in fields}
    values["vocab_size"] = model_config.vocab_size or vocab_size
    return cls(**values)


class GPT(nnx.Module):
  """Causal LM: token ids (B, T) -> next-token logits (B, T, V)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # Each residual branch's output projection is scaled down by sqrt(2 x layers) (GPT-2), so the
    # residual stream's variance does not grow with depth at init.
    out_std = INIT_STD / math.sqrt(2 * cfg.num_layers)
    self.embed = param(rngs.params(), (cfg.vocab_size, cfg.width), INIT_STD, ("vocab", "embed"))
    self.pos_embed = (param(rngs.params(), (cfg.max_seq_len, cfg.width), INIT_STD, (None, "embed"))
                      if cfg.position == "learned" else None)
    self.blocks = nnx.List([Block(cfg, INIT_STD, out_std, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg.width, cfg.norm)
    # Tied weights: the output layer reuses the input embedding (fewer parameters, and helps small models).
    self.lm_head = (None if cfg.tie_embeddings else
                    param(rngs.params(), (cfg.width, cfg.vocab_size), INIT_STD, ("embed", "vocab")))

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
      positions_BxT = jnp.arange(t, dtype=jnp.int32)[None]
    if kv_cache is None:
      mask_Bx1xTxS = attention_mask(t, segment_ids_BxT)
    else:
      s = kv_cache[0][0].shape[2]
      mask_Bx1xTxS = jnp.arange(s)[None, None, None, :] <= positions_BxT[:, None, :, None]
    x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0)
    if self.pos_embed is not None:
      x_BxTxD = x_BxTxD + jnp.take(self.pos_embed[...], positions_BxT, axis=0)
    keys = (jax.random.split(dropout_key, self.cfg.num_layers + 1) if dropout_key is not None
            else [None] * (self.cfg.num_layers + 1))
    x_BxTxD = constrain(dropout(x_BxTxD, self.cfg.dropout, keys[-1]), ("batch", "seq", "act_embed"))
    caches = kv_cache if kv_cache is not None else [None] * self.cfg.num_layers
    new_caches = []
    for block, key, cache in zip(self.blocks, keys[:-1], caches):
      x_BxTxD, cache = block(x_BxTxD, key, mask_Bx1xTxS, positions_BxT, cache)
      new_caches.append(cache)
    x_BxTxD = self.final_norm(x_BxTxD)
    if self.lm_head is None:
      logits_BxTxV = matmul("btd,vd->btv", x_BxTxD, self.embed[...], self.cfg.dtype)
    else:
      logits_BxTxV = matmul("btd,dv->btv", x_BxTxD, self.lm_head[...], self.cfg.dtype)
    logits_BxTxV = constrain(logits_BxTxV, ("batch", "seq", "vocab"))
    return logits_BxTxV if kv_cache is None else (logits_BxTxV, new_caches)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list[tuple[jax.Array, jax.Array]]:
  """An empty KV cache for `batch` rows of up to `length` positions: (keys, values) per layer."""
  head_dim = cfg.width // cfg.num_heads
  shape = (batch, cfg.num_heads, length, head_dim)
  return [(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)) for _ in range(cfg.num_layers)]
