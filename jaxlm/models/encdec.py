"""The encoder-decoder transformer (T5): a bidirectional encoder reads the input, a causal decoder writes
the target, attending to the encoder's output through cross-attention in every block.

The layers are the other families' (layers.py), with the same logical axis names, so meshes, FSDP,
tensor parallelism, bf16 and checkpoints work unchanged. One embedding table serves the encoder, the
decoder and (tied, by `model.tie_embeddings`) the output layer. Encoder and decoder have
`model.num_layers` blocks each.

Positions: rotary (RoPE) in both self-attentions, counted from 0 in each packed example; none in
cross-attention (layers.CrossAttention says why). RoPE is relative, so an example gives the same
outputs wherever it sits in a packed row, and the decoder needs no position table for decoding.

Masks: the encoder's self-attention sees its own example (segment) only, never padding (segment 0); the
decoder's is causal within its example; cross-attention sees the encoder positions of the same example,
never padding or another packed example.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import stack
from jaxlm.models.decoder import causal_mask
from jaxlm.models.layers import Block, Mask, Norm, attention_mask, param
from jaxlm.models.transformer import INIT_STD, ModelConfig, default_positions, embed_tokens, layer_keys, output_logits


def cross_mask(target_segment_ids_BxT: jax.Array | None, input_segment_ids_BxS: jax.Array | None,
               s: int) -> jax.Array:
  """Which encoder positions each decoder position sees: (B or 1, 1, T or 1, S)."""
  if input_segment_ids_BxS is None:
    return jnp.ones((1, 1, 1, s), bool)
  real_Bx1x1xS = (input_segment_ids_BxS != 0)[:, None, None, :]
  if target_segment_ids_BxT is None:
    return real_Bx1x1xS
  same_Bx1xTxS = target_segment_ids_BxT[:, None, :, None] == input_segment_ids_BxS[:, None, None, :]
  return same_Bx1xTxS & real_Bx1x1xS


class EncoderDecoder(nnx.Module):
  """(input ids (B, S), decoder input ids (B, T)) -> logits (B, T, V) of each next target token."""

  family = "encoder-decoder"

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # Output projections scaled by sqrt(residual branches): 2 per encoder block, 3 per decoder block.
    enc_std, dec_std = INIT_STD / math.sqrt(2 * cfg.num_layers), INIT_STD / math.sqrt(3 * cfg.num_layers)
    self.embed = param(rngs.params(), (cfg.vocab_size, cfg.width), INIT_STD, ("vocab", "embed"))
    n, scan = cfg.num_layers, cfg.scan_layers
    self.encoder = stack.make_blocks(lambda r: Block(cfg, INIT_STD, enc_std, r), n, scan, rngs.params())
    self.encoder_norm = Norm(cfg.width, cfg.norm, cfg.norm_eps)
    self.decoder = stack.make_blocks(lambda r: Block(cfg, INIT_STD, dec_std, r, cross=True), n, scan, rngs.params())
    self.final_norm = Norm(cfg.width, cfg.norm, cfg.norm_eps)
    self.lm_head = (None if cfg.tie_embeddings else
                    param(rngs.params(), (cfg.width, cfg.vocab_size), INIT_STD, ("embed", "vocab")))

  def __call__(self, inputs_BxS: jax.Array, decoder_inputs_BxT: jax.Array, dropout_key=None, *,
               input_segment_ids: jax.Array | None = None, input_positions: jax.Array | None = None,
               target_segment_ids: jax.Array | None = None, target_positions: jax.Array | None = None):
    """Logits (float32) of the targets; decoder position t sees decoder inputs 0..t of its example and
    the whole encoded input of its example. Segment ids and positions describe packed rows."""
    keys = layer_keys(dropout_key, 2)
    enc_BxSxD = self.encode(inputs_BxS, input_segment_ids, input_positions, keys[0])
    mask = cross_mask(target_segment_ids, input_segment_ids, inputs_BxS.shape[1])
    # (Each decoder block projects the encoder's output to its keys and values as it runs.)
    return self.decode(decoder_inputs_BxT, enc_BxSxD, mask, segment_ids_BxT=target_segment_ids,
                       positions_BxT=target_positions, dropout_key=keys[1])

  def encode(self, tokens_BxS: jax.Array, segment_ids_BxS: jax.Array | None = None,
             positions_BxS: jax.Array | None = None, dropout_key=None) -> jax.Array:
    """The encoder's output (B, S, D), normed."""
    s = tokens_BxS.shape[1]
    positions_BxS = default_positions(s) if positions_BxS is None else positions_BxS
    keys = layer_keys(dropout_key, self.cfg.num_layers + 1)
    x_BxSxD = embed_tokens(self.embed, tokens_BxS, self.cfg, keys[-1])
    mask = Mask(attention_mask(s, segment_ids_BxS, causal=False), segment_ids_BxS, causal=False)
    x_BxSxD, _ = stack.run(self.encoder, self.cfg.num_layers, self.cfg.remat, x_BxSxD, keys[:-1], mask,
                           positions_BxS)
    return self.encoder_norm(x_BxSxD)

  def cross_keys_values(self, enc_BxSxD: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Every decoder block's cross-attention keys and values of an encoded input: computed once per
    input, reused at every decoded token."""
    return [block.cross_attn.keys_values(enc_BxSxD) for block in stack.each_layer(self.decoder, self.cfg.num_layers)]

  def decode(self, tokens_BxT: jax.Array, cross_kv, cross_mask_Bx1xTxS: jax.Array, *,
             segment_ids_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
             dropout_key=None, kv_cache: list | None = None):
    """Logits of the decoder over `tokens_BxT`, given the encoded input's keys and values
    (`cross_keys_values`), or the encoded input itself, which each block then projects.

    With `kv_cache` (from models.decoder.init_cache), the tokens are the next ones of each row at
    `positions_BxT`, written into the self-attention cache; returns (logits, updated cache), as the
    decoder-only model does (generate.py, seq2seq.py).
    """
    t = tokens_BxT.shape[1]
    positions_BxT = default_positions(t) if positions_BxT is None else positions_BxT
    keys = layer_keys(dropout_key, self.cfg.num_layers + 1)
    x_BxTxD = embed_tokens(self.embed, tokens_BxT, self.cfg, keys[-1])
    mask = causal_mask(t, segment_ids_BxT, positions_BxT, kv_cache)
    x_BxTxD, caches = stack.run(self.decoder, self.cfg.num_layers, self.cfg.remat, x_BxTxD, keys[:-1], mask,
                                positions_BxT, kv_cache, (cross_kv, cross_mask_Bx1xTxS))
    logits_BxTxV = output_logits(self.final_norm(x_BxTxD), self.embed, self.lm_head, self.cfg.dtype)
    return logits_BxTxV if kv_cache is None else (logits_BxTxV, caches)
