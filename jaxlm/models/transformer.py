"""What every model family shares: its hyperparameters (`ModelConfig`) and the trunk: token (and
learned position) embeddings, a stack of pre-norm blocks, a final norm and the output logits.

The families (decoder.py, encoder.py) differ only in which keys each query sees (the attention mask) and
in what they cache, so their parameters have the same names and shapes and share every layer.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import stack
from jaxlm.models.layers import Block, Mask, Norm, dropout, matmul, param
from jaxlm.parallel import constrain

INIT_STD = 0.02  # GPT-2's init


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyperparameters: hashable, so it can live in the NNX graph definition."""

  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0  # 0: num_heads
  width: int = 128
  mlp_width: int = 512
  max_seq_len: int = 256
  position: str = "rope"
  rope_base: float = 10000.0
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  mlp: str = "gelu"
  tie_embeddings: bool = True
  use_bias: bool = False
  dropout: float = 0.0
  dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "einsum"

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "ModelConfig":
    """From the config's `model` section; vocab_size 0 there means the tokenizer's (given here)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_config.to_dict().items() if k in fields}
    values["vocab_size"] = model_config.vocab_size or vocab_size
    return cls(**values)


class Trunk(nnx.Module):
  """Embeddings, blocks, final norm and logits; a family's __call__ gives the mask (and cache)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # Each residual branch's output projection is scaled down by sqrt(2 x layers) (GPT-2), so the
    # residual stream's variance does not grow with depth at init.
    out_std = INIT_STD / math.sqrt(2 * cfg.num_layers)
    self.embed = param(rngs.params(), (cfg.vocab_size, cfg.width), INIT_STD, ("vocab", "embed"))
    self.pos_embed = (param(rngs.params(), (cfg.max_seq_len, cfg.width), INIT_STD, (None, "embed"))
                      if cfg.position == "learned" else None)
    self.blocks = stack.make_blocks(lambda r: Block(cfg, INIT_STD, out_std, r), cfg.num_layers, cfg.scan_layers,
                                    rngs.params())
    self.final_norm = Norm(cfg.width, cfg.norm, cfg.norm_eps)
    # Tied weights: the output layer reuses the input embedding (fewer parameters, and helps small models).
    self.lm_head = (None if cfg.tie_embeddings else
                    param(rngs.params(), (cfg.width, cfg.vocab_size), INIT_STD, ("embed", "vocab")))

  def forward(self, tokens_BxT: jax.Array, mask: Mask, positions_BxT: jax.Array,
              dropout_key: jax.Array | None, caches: list | None = None):
    """(logits (float32, B x T x V), the blocks' updated KV caches or None)."""
    keys = layer_keys(dropout_key, self.cfg.num_layers + 1)
    x_BxTxD = embed_tokens(self.embed, tokens_BxT, self.cfg, keys[-1], self.pos_embed, positions_BxT)
    x_BxTxD, new_caches = stack.run(self.blocks, self.cfg.num_layers, self.cfg.remat, x_BxTxD, keys[:-1], mask,
                                    positions_BxT, caches)
    logits_BxTxV = output_logits(self.final_norm(x_BxTxD), self.embed, self.lm_head, self.cfg.dtype)
    return logits_BxTxV, (new_caches if caches is not None else None)


def layer_keys(dropout_key: jax.Array | None, n: int) -> list:
  """n dropout keys (one per layer, and for the embeddings), or n Nones without dropout."""
  return list(jax.random.split(dropout_key, n)) if dropout_key is not None else [None] * n


def embed_tokens(embed: nnx.Param, tokens_BxT: jax.Array, cfg: ModelConfig, dropout_key,
                 pos_embed: nnx.Param | None = None, positions_BxT: jax.Array | None = None) -> jax.Array:
  """Token embeddings (plus learned position embeddings), with dropout."""
  x_BxTxD = jnp.take(embed[...], tokens_BxT, axis=0)
  if pos_embed is not None:
    x_BxTxD = x_BxTxD + jnp.take(pos_embed[...], positions_BxT, axis=0)
  return constrain(dropout(x_BxTxD, cfg.dropout, dropout_key), ("batch", "seq", "act_embed"))


def output_logits(x_BxTxD: jax.Array, embed: nnx.Param, lm_head: nnx.Param | None, dtype: str) -> jax.Array:
  """Logits over the vocabulary from the (normed) last hidden states: tied to the input embedding, or
  through an untied output layer."""
  if lm_head is None:
    logits_BxTxV = matmul("btd,vd->btv", x_BxTxD, embed[...], dtype)
  else:
    logits_BxTxV = matmul("btd,dv->btv", x_BxTxD, lm_head[...], dtype)
  return constrain(logits_BxTxV, ("batch", "seq", "vocab"))


def default_positions(t: int) -> jax.Array:
  return jnp.arange(t, dtype=jnp.int32)[None]
