"""Transformer building blocks in Flax NNX: matmul, norms, rotary positions, attention, MLP, block.

Shapes are in the names (`x_BxTxD`: batch, time, width; H heads of K features; F MLP width; V vocab).
Parameters are float32 and carry logical axis names; `dtype` is the compute dtype of the matmuls.
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.parallel import constrain

F32, BF16 = jnp.float32, jnp.bfloat16
CAUSAL_BLOCK = 128  # query positions per block of causal self-attention (a context of 2 blocks or more)


def param(key, shape, std, names) -> nnx.Param:
  """A normal(0, std) float32 parameter with logical axis names (std 0: zeros, -1: ones)."""
  if std == 0:
    value = jnp.zeros(shape, F32)
  elif std < 0:
    value = jnp.ones(shape, F32)
  else:
    value = std * jax.random.normal(key, shape, F32)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _transposed_equations(eq: str) -> tuple[str, str]:
  """For 'ab,bc->ac': the einsums giving each operand's gradient from the output's ('ac,bc->ab', ...)."""
  ins, out = eq.split("->")
  a, b = ins.split(",")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_einsum(eq, a, b):
  return jnp.einsum(eq, a.astype(BF16), b.astype(BF16), preferred_element_type=F32)


def _bf16_einsum_fwd(eq, a, b):
  a16, b16 = a.astype(BF16), b.astype(BF16)
  return jnp.einsum(eq, a16, b16, preferred_element_type=F32), (a16, b16)


def _bf16_einsum_bwd(eq, residuals, g):
  # Plain autodiff would make f32 x bf16 dots here; bf16 x bf16 -> f32 is what reaches AMX / MXU units.
  a16, b16 = residuals
  g16 = g.astype(BF16)
  eq_a, eq_b = _transposed_equations(eq)
  return (jnp.einsum(eq_a, g16, b16, preferred_element_type=F32),
          jnp.einsum(eq_b, a16, g16, preferred_element_type=F32))


_bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def matmul(eq: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
  """einsum in the compute dtype with a float32 result; in bf16 both passes multiply bf16 x bf16."""
  if dtype == "bfloat16":
    return _bf16_einsum(eq, a.astype(F32), b.astype(F32))
  return jnp.einsum(eq, a, b)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; a no-op at rate 0 or without a key (evaluation, sampling)."""
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class Norm(nnx.Module):
  """RMSNorm (scale only) or LayerNorm (scale and bias), computed in float32."""

  def __init__(self, width: int, kind: str, eps: float):
    self.kind, self.eps = kind, eps
    self.scale = param(None, (width,), -1, ("norm",))
    self.bias = param(None, (width,), 0, ("norm",)) if kind == "layernorm" else None

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x = x_BxTxD.astype(F32)
    if self.kind == "layernorm":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale[...]
    return x + self.bias[...] if self.bias is not None else x


def rope(x_BxHxTxK: jax.Array, base: float, positions_BxT: jax.Array) -> jax.Array:
  """Rotary position embedding: rotates feature pairs (i, i + K/2) by position-dependent angles."""
  k = x_BxHxTxK.shape[3]
  inv_freq_K2 = base ** (-jnp.arange(0, k, 2, dtype=F32) / k)
  angle_Bx1xTxK2 = positions_BxT.astype(F32)[:, None, :, None] * inv_freq_K2
  sin, cos = jnp.sin(angle_Bx1xTxK2), jnp.cos(angle_Bx1xTxK2)
  x1, x2 = jnp.split(x_BxHxTxK, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(t: int, segment_ids_BxT: jax.Array | None, causal: bool = True) -> jax.Array:
  """Which keys each query sees: earlier positions when `causal` (all otherwise), of the same segment
  (document) when segment ids are given.

  (1, 1, T, T), or (B, 1, T, T) with segment ids (one id per document in a packed row; padding has its
  own id, 0, so real positions never see it).
  """
  causal_1x1xTxT = jnp.tril(jnp.ones((t, t), bool))[None, None] if causal else None
  if segment_ids_BxT is None:
    return causal_1x1xTxT if causal else jnp.ones((1, 1, t, t), bool)
  same_Bx1xTxT = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
  return causal_1x1xTxT & same_Bx1xTxT if causal else same_Bx1xTxT


@flax.struct.dataclass
class Mask:
  """Which keys each query sees: the dense boolean mask (B or 1, 1, T, S) every implementation can use,
  and what it was made of (causal, the segment ids of a packed row), which fused kernels take instead."""

  dense: jax.Array
  segment_ids: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=True)


class Attention(nnx.Module):
  """Multi-head self-attention under a given mask (causal, per document); softmax in float32.

  With `num_kv_heads` below `num_heads` it is grouped-query attention: each key/value head serves
  num_heads / num_kv_heads query heads (1: multi-query), and the KV cache holds num_kv_heads heads.
  Multi-head attention keeps one fused (D, 3, H, K) projection; grouped-query has a query (D, H, K) and
  a key/value (D, 2, G, K) projection.
  """

  def __init__(self, cfg, init_std: float, out_std: float, rngs: nnx.Rngs):
    d, h, g = cfg.width, cfg.num_heads, cfg.kv_heads
    self.dtype, self.position, self.rope_base, self.impl = cfg.dtype, cfg.position, cfg.rope_base, cfg.attention
    if g == h:
      self.qkv = param(rngs.params(), (d, 3, h, d // h), init_std, ("embed", None, "heads", "kv"))
      self.qkv_bias = param(None, (3, h, d // h), 0, (None, "heads", "kv")) if cfg.use_bias else None
    else:
      self.q = param(rngs.params(), (d, h, d // h), init_std, ("embed", "heads", "kv"))
      self.kv = param(rngs.params(), (d, 2, g, d // h), init_std, ("embed", None, "kv_heads", "kv"))
      self.q_bias = param(None, (h, d // h), 0, ("heads", "kv")) if cfg.use_bias else None
      self.kv_bias = param(None, (2, g, d // h), 0, (None, "kv_heads", "kv")) if cfg.use_bias else None
    self.out = param(rngs.params(), (h, d // h, d), out_std, ("heads", "kv", "embed"))
    self.out_bias = param(None, (d,), 0, ("embed",)) if cfg.use_bias else None

  def _project(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries (B, H, T, K), keys and values (B, G, T, K)."""
    # Heads-major (3, B, H, T, K) keeps every attention product a plain batched matmul over (B, H),
    # which XLA CPU runs in bf16 (it has no bf16 kernel for some other layouts of the same products).
    if hasattr(self, "qkv"):
      qkv_3xBxHxTxK = _with_bias(matmul("btd,dchk->cbhtk", x_BxTxD, self.qkv[...], self.dtype), self.qkv_bias)
      qkv_3xBxHxTxK = constrain(qkv_3xBxHxTxK, (None, "batch", "heads", "seq", None))
      return qkv_3xBxHxTxK[0], qkv_3xBxHxTxK[1], qkv_3xBxHxTxK[2]
    q_BxHxTxK = _with_bias(matmul("btd,dhk->bhtk", x_BxTxD, self.q[...], self.dtype), self.q_bias)
    kv_2xBxGxTxK = _with_bias(matmul("btd,dcgk->cbgtk", x_BxTxD, self.kv[...], self.dtype), self.kv_bias)
    kv_2xBxGxTxK = constrain(kv_2xBxGxTxK, (None, "batch", "kv_heads", "seq", None))
    return constrain(q_BxHxTxK, ("batch", "heads", "seq", None)), kv_2xBxGxTxK[0], kv_2xBxGxTxK[1]

  def __call__(self, x_BxTxD: jax.Array, mask: Mask, positions_BxT: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None = None):
    """-> (output, updated cache). Without a cache, keys are the T positions themselves (S = T).

    With a KV cache (keys, values), each (B, G, S, K), this call's keys and values are written at its
    positions (contiguous in each row, from positions_BxT[:, 0]) and the queries attend over the cache.
    """
    q_BxHxTxK, k_BxGxTxK, v_BxGxTxK = self._project(x_BxTxD)
    if self.position == "rope":
      q_BxHxTxK = rope(q_BxHxTxK, self.rope_base, positions_BxT)
      k_BxGxTxK = rope(k_BxGxTxK, self.rope_base, positions_BxT)
    if cache is not None:
      starts_B = positions_BxT[:, 0]
      cache = (_write_rows(cache[0], k_BxGxTxK, starts_B), _write_rows(cache[1], v_BxGxTxK, starts_B))
      k_BxGxSxK, v_BxGxSxK = cache
    else:
      k_BxGxSxK, v_BxGxSxK = k_BxGxTxK, v_BxGxTxK
    impl = self.impl if cache is None else "einsum"  # (decoding: one query over the cache)
    y_BxHxTxK = attend(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, mask, self.dtype, impl)
    return _project_out(y_BxHxTxK, self.out, self.out_bias, self.dtype), cache


def _with_bias(x: jax.Array, bias: nnx.Param | None) -> jax.Array:
  """x (C.., B, H, T, K) plus a (C.., H, K) bias, broadcast over batch and time."""
  if bias is None:
    return x
  b = bias[...]
  return x + b.reshape(*b.shape[:-2], 1, b.shape[-2], 1, b.shape[-1])


def attend(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, mask: Mask, dtype: str, impl: str = "einsum") -> jax.Array:
  """Scaled dot-product attention of T queries over S keys where the mask allows; softmax in float32.
  G key/value heads serve H query heads (G divides H; query head h uses key/value head h // (H/G)).

  A query whose keys are all masked (padding) gets the mean of the values, never NaN.
  impl: einsum (below; causal self-attention of 2 x CAUSAL_BLOCK positions or more in blocks of queries)
  | dot_product / cudnn (jax.nn.dot_product_attention) | splash (the Pallas TPU kernel, kernels.py).
  """
  if impl != "einsum":
    return _fused_attention(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, mask, dtype, impl)
  t = q_BxHxTxK.shape[2]
  if mask.causal and t == k_BxGxSxK.shape[2] and t >= 2 * CAUSAL_BLOCK:
    # Causal self-attention: query block i needs keys 0..end of block i only; the rest of its row is
    # masked (exp underflows to exactly 0), so skipping it changes no number beyond summation order
    # and saves a quarter (T = 2 blocks) or more of the scores' matmuls and softmax.
    ends = range(CAUSAL_BLOCK, t + CAUSAL_BLOCK, CAUSAL_BLOCK)
    return jnp.concatenate([_attend(q_BxHxTxK[:, :, end - CAUSAL_BLOCK:end], k_BxGxSxK[:, :, :end],
                                    v_BxGxSxK[:, :, :end], mask.dense[..., end - CAUSAL_BLOCK:end, :end], dtype)
                            for end in ends], axis=2)
  return _attend(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, mask.dense, dtype)


def _attend(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, mask_dense, dtype: str) -> jax.Array:
  b, h, t, k = q_BxHxTxK.shape
  g = k_BxGxSxK.shape[1]
  q_BxHxTxK = q_BxHxTxK / math.sqrt(k)
  if g == h:
    scores_BxHxTxS = matmul("bhqk,bhsk->bhqs", q_BxHxTxK, k_BxGxSxK, dtype)
    scores_BxHxTxS = jnp.where(mask_dense, scores_BxHxTxS, jnp.finfo(F32).min)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    return matmul("bhqs,bhsk->bhqk", probs_BxHxTxS, v_BxGxSxK, dtype)
  q_BxGxRxTxK = q_BxHxTxK.reshape(b, g, h // g, t, k)
  scores_BxGxRxTxS = matmul("bgrqk,bgsk->bgrqs", q_BxGxRxTxK, k_BxGxSxK, dtype)
  scores_BxGxRxTxS = jnp.where(mask_dense[:, :, None], scores_BxGxRxTxS, jnp.finfo(F32).min)
  probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1)
  return matmul("bgrqs,bgsk->bgrqk", probs_BxGxRxTxS, v_BxGxSxK, dtype).reshape(b, h, t, k)


def _fused_attention(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, mask: Mask, dtype: str, impl: str) -> jax.Array:
  """jax.nn.dot_product_attention (XLA's, or cuDNN's flash kernel), or the Pallas splash kernel."""
  if impl == "splash":
    from jaxlm.models import kernels

    return kernels.splash_attention(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, causal=mask.causal,
                                    segment_ids_BxT=mask.segment_ids).astype(F32)
  compute = BF16 if dtype == "bfloat16" or impl == "cudnn" else F32
  q_BxTxHxK, k_BxSxGxK, v_BxSxGxK = (x.swapaxes(1, 2).astype(compute) for x in (q_BxHxTxK, k_BxGxSxK, v_BxGxSxK))
  if impl == "cudnn" and mask.causal and mask.segment_ids is None and q_BxTxHxK.shape[1] == k_BxSxGxK.shape[1]:
    y_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, is_causal=True,
                                             implementation="cudnn")
  else:
    y_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask.dense,
                                             implementation="cudnn" if impl == "cudnn" else "xla")
  return y_BxTxHxK.swapaxes(1, 2).astype(F32)


def _project_out(y_BxHxTxK, out: nnx.Param, out_bias: nnx.Param | None, dtype: str) -> jax.Array:
  y_BxTxD = matmul("bhtk,hkd->btd", y_BxHxTxK, out[...], dtype)
  return y_BxTxD + out_bias[...] if out_bias is not None else y_BxTxD


class CrossAttention(nnx.Module):
  """Attention of the decoder's positions over the encoder's outputs (encoder-decoder models).

  No rotary positions: a query and a key are positions of two different sequences, so their distance
  means nothing (T5's cross-attention has no position bias either); order reaches it through the
  encoder's and decoder's own self-attention. The keys and values depend on the encoder's output only,
  so decoding computes them once per input (`keys_values`) and reuses them at every new token.
  """

  def __init__(self, cfg, init_std: float, out_std: float, rngs: nnx.Rngs):
    d, h = cfg.width, cfg.num_heads
    self.dtype = cfg.dtype
    self.q = param(rngs.params(), (d, h, d // h), init_std, ("embed", "heads", "kv"))
    self.kv = param(rngs.params(), (d, 2, h, d // h), init_std, ("embed", None, "heads", "kv"))
    self.out = param(rngs.params(), (h, d // h, d), out_std, ("heads", "kv", "embed"))
    self.q_bias = param(None, (h, d // h), 0, ("heads", "kv")) if cfg.use_bias else None
    self.kv_bias = param(None, (2, h, d // h), 0, (None, "heads", "kv")) if cfg.use_bias else None
    self.out_bias = param(None, (d,), 0, ("embed",)) if cfg.use_bias else None

  def keys_values(self, enc_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The encoder output's keys and values, each (B, H, S, K)."""
    kv_2xBxHxSxK = _with_bias(matmul("bsd,dchk->cbhsk", enc_BxSxD, self.kv[...], self.dtype), self.kv_bias)
    kv_2xBxHxSxK = constrain(kv_2xBxHxSxK, (None, "batch", "heads", "seq", None))
    return kv_2xBxHxSxK[0], kv_2xBxHxSxK[1]

  def __call__(self, x_BxTxD: jax.Array, kv: tuple[jax.Array, jax.Array], mask_Bx1xTxS: jax.Array):
    q_BxHxTxK = _with_bias(matmul("btd,dhk->bhtk", x_BxTxD, self.q[...], self.dtype), self.q_bias)
    q_BxHxTxK = constrain(q_BxHxTxK, ("batch", "heads", "seq", None))
    # (Always jaxlm's einsum: the fused kernels' masks are self-attention's.)
    y_BxHxTxK = attend(q_BxHxTxK, kv[0], kv[1], Mask(mask_Bx1xTxS, causal=False), self.dtype)
    return _project_out(y_BxHxTxK, self.out, self.out_bias, self.dtype)


def _write_rows(cache_BxHxSxK: jax.Array, new_BxHxTxK: jax.Array, starts_B: jax.Array) -> jax.Array:
  """Writes each row's T new entries into its cache at positions start..start+T-1."""
  write = lambda c, u, p: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (0, p, 0))
  return jax.vmap(write)(cache_BxHxSxK, new_BxHxTxK, starts_B)


class MLP(nnx.Module):
  """GELU MLP (the tanh approximation, GPT-2's `gelu_new`), or SwiGLU (a gated unit: silu(x W_gate) * (x W_up),
  Llama's)."""

  def __init__(self, cfg, init_std: float, out_std: float, rngs: nnx.Rngs):
    d, f = cfg.width, cfg.mlp_width
    self.kind, self.dtype = cfg.mlp, cfg.dtype
    self.up = param(rngs.params(), (d, f), init_std, ("embed", "mlp"))
    self.gate = param(rngs.params(), (d, f), init_std, ("embed", "mlp")) if cfg.mlp == "swiglu" else None
    self.down = param(rngs.params(), (f, d), out_std, ("mlp", "embed"))
    self.up_bias = param(None, (f,), 0, ("mlp",)) if cfg.use_bias else None
    self.down_bias = param(None, (d,), 0, ("embed",)) if cfg.use_bias else None

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h_BxTxF = matmul("btd,df->btf", x_BxTxD, self.up[...], self.dtype)
    if self.up_bias is not None:
      h_BxTxF = h_BxTxF + self.up_bias[...]
    if self.gate is not None:
      h_BxTxF = jax.nn.silu(matmul("btd,df->btf", x_BxTxD, self.gate[...], self.dtype)) * h_BxTxF
    else:
      h_BxTxF = jax.nn.gelu(h_BxTxF)
    h_BxTxF = constrain(h_BxTxF, ("batch", "seq", "mlp"))
    y_BxTxD = matmul("btf,fd->btd", h_BxTxF, self.down[...], self.dtype)
    return y_BxTxD + self.down_bias[...] if self.down_bias is not None else y_BxTxD


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then (with `cross`, in an encoder-decoder's decoder)
  x + cross_attn(norm(x), encoder output), then x + mlp(norm(x))."""

  def __init__(self, cfg, init_std: float, out_std: float, rngs: nnx.Rngs, cross: bool = False):
    self.dropout_rate = cfg.dropout
    self.attn_norm = Norm(cfg.width, cfg.norm, cfg.norm_eps)
    self.attn = Attention(cfg, init_std, out_std, rngs)
    if cross:
      self.cross_norm = Norm(cfg.width, cfg.norm, cfg.norm_eps)
      self.cross_attn = CrossAttention(cfg, init_std, out_std, rngs)
    self.mlp_norm = Norm(cfg.width, cfg.norm, cfg.norm_eps)
    self.mlp = MLP(cfg, init_std, out_std, rngs)

  def __call__(self, x_BxTxD: jax.Array, dropout_key: jax.Array | None, mask: Mask,
               positions_BxT: jax.Array, cache=None, cross=None):
    """-> (output, updated KV cache or None). `cross`: (this block's encoder keys and values, or the
    encoder's output (B, S, D) to project here; the cross mask)."""
    keys = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    attn_BxTxD, cache = self.attn(self.attn_norm(x_BxTxD), mask, positions_BxT, cache)
    x_BxTxD = x_BxTxD + dropout(attn_BxTxD, self.dropout_rate, keys[0])
    x_BxTxD = constrain(x_BxTxD, ("batch", "seq", "act_embed"))
    if cross is not None:
      kv, cross_mask_Bx1xTxS = cross
      kv = kv if isinstance(kv, tuple) else self.cross_attn.keys_values(kv)
      cross_key = jax.random.fold_in(dropout_key, 2) if dropout_key is not None else None
      cross_BxTxD = self.cross_attn(self.cross_norm(x_BxTxD), kv, cross_mask_Bx1xTxS)
      x_BxTxD = constrain(x_BxTxD + dropout(cross_BxTxD, self.dropout_rate, cross_key),
                          ("batch", "seq", "act_embed"))
    x_BxTxD = x_BxTxD + dropout(self.mlp(self.mlp_norm(x_BxTxD)), self.dropout_rate, keys[1])
    return constrain(x_BxTxD, ("batch", "seq", "act_embed")), cache
