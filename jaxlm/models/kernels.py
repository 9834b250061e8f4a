"""The Pallas TPU splash attention kernel that jax ships, with jaxlm's attention semantics.

`splash_attention` takes the same (B, H, T, K) / (B, G, S, K) layout as `layers.attend`, divides q by
sqrt(K) like it does, and masks causally and/or by segment id (one id per packed document; 0 is
padding). Off TPU, `interpret=True` runs the same kernel (forward and its custom VJP) in Pallas
interpret mode, which is slow but exact enough to test against a plain reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from flax.core import spmd
from jaxlm.parallel import logical_to_spec

LANES = 128  # the kernel's key blocks (and segment-id tiles) must be multiples of the TPU lane width
BLOCK_CHOICES = (512, 256, 128)  # largest that divides the padded length wins
PAD_SEGMENT = -1  # id of the positions added to reach a block multiple; jaxlm's ids are >= 0


def splash_attention(q_BxHxTxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array, *, causal: bool,
                     segment_ids_BxT: jax.Array | None = None, interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(K) where allowed) v, computed by the splash kernel; returns y_BxHxTxK in q's dtype.

  G key/value heads serve H query heads (G divides H; query head h uses key/value head h // (H/G)),
  which the kernel's multi-head form does natively (its k/v index maps divide the head index), so k
  and v are never repeated and dk/dv come back summed over each group (G == 1 uses the kernel's
  multi-query form). Causal, or with segment ids (B, T), it is self-attention (T == S); with segment
  ids a query sees keys of its own segment only (padding, id 0, sees padding: finite, unused).

  Under a mesh (`jax.set_mesh`) it runs per device through shard_map, placed by the logical-axis rules
  in context (_on_mesh). T and S are padded up to a multiple of 128 and the output sliced back; blocks
  are the largest of 512/256/128 dividing the padded length. Causally, no real query sees the added tail; otherwise the
  added keys get segment id PAD_SEGMENT so no real query sees them (_padded_segment_ids).
  """
  _check_shapes(q_BxHxTxK.shape[1], k_BxGxSxK.shape[1], q_BxHxTxK.shape[2], k_BxGxSxK.shape[2], causal,
                segment_ids_BxT)
  local = functools.partial(_splash_local, causal=causal, interpret=interpret)
  if jax.sharding.get_abstract_mesh().empty:
    return local(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, segment_ids_BxT)
  return _on_mesh(local, q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, segment_ids_BxT)


def _on_mesh(local, q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, segment_ids_BxT):
  """`local` on each device's block under shard_map: a Pallas kernel is opaque to XLA's partitioner,
  which would otherwise gather every operand onto every device. Rows shard as the rules place "batch",
  query heads as "heads", key/value heads as "kv_heads" (the same mesh axes, so each device's query heads
  find their group's key/value heads locally; a single key/value head may be replicated)."""
  rules = spmd.get_logical_axis_rules()
  q_spec = logical_to_spec(("batch", "heads", None, None), rules)
  kv_spec = logical_to_spec(("batch", "kv_heads" if k_BxGxSxK.shape[1] > 1 else None, None, None), rules)
  mesh = jax.sharding.get_abstract_mesh()
  split = lambda axes: math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
  if k_BxGxSxK.shape[1] > 1 and kv_spec[1] != q_spec[1] and split(q_spec[1]) * split(kv_spec[1]) > 1:
    raise ValueError(f"splash attention on a mesh needs key/value heads sharded as the query heads "
                     f"({kv_spec[1]} vs {q_spec[1]}: mesh.rules kv_heads and heads)")
  ids_spec = logical_to_spec(("batch", None), rules)
  if segment_ids_BxT is None:
    fn = jax.shard_map(lambda q, k, v: local(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK)
  fn = jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec, check_vma=False)
  return fn(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, segment_ids_BxT)


def _splash_local(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, segment_ids_BxT, *, causal: bool, interpret: bool):
  """splash_attention on arrays of one device (or unsharded ones)."""
  b, h, t, k = q_BxHxTxK.shape
  g, s = k_BxGxSxK.shape[1], k_BxGxSxK.shape[2]
  t_pad, s_pad = _round_up(t, LANES), _round_up(s, LANES)
  segment_ids = _padded_segment_ids(b, t, s, t_pad, s_pad, causal, segment_ids_BxT)
  kernel = _make_kernel(h, t_pad, s_pad, causal, g == 1, interpret)
  q_BxHxTpxK = _pad_time(q_BxHxTxK / math.sqrt(k), t_pad)
  k_BxGxSpxK, v_BxGxSpxK = _pad_time(k_BxGxSxK, s_pad), _pad_time(v_BxGxSxK, s_pad)
  if g == 1:  # multi-query: the kernel's MQA form takes a single (S, K) key/value head
    k_BxGxSpxK, v_BxGxSpxK = k_BxGxSpxK[:, 0], v_BxGxSpxK[:, 0]
  if segment_ids is None:
    y_BxHxTpxK = jax.vmap(kernel)(q_BxHxTpxK, k_BxGxSpxK, v_BxGxSpxK)
  else:
    y_BxHxTpxK = jax.vmap(lambda q, kk, v, ids: kernel(q, kk, v, segment_ids=ids))(
        q_BxHxTpxK, k_BxGxSpxK, v_BxGxSpxK, segment_ids)
  return y_BxHxTpxK[:, :, :t]


def _check_shapes(h: int, g: int, t: int, s: int, causal: bool, segment_ids_BxT: jax.Array | None) -> None:
  if h % g:
    raise ValueError(f"{g} key/value heads must divide {h} query heads")
  if (causal or segment_ids_BxT is not None) and t != s:
    raise ValueError(f"causal or segmented splash attention is self-attention (T == S), got T={t}, S={s}")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_time(x_BxNxTxK: jax.Array, t_pad: int) -> jax.Array:
  extra = t_pad - x_BxNxTxK.shape[2]
  return jnp.pad(x_BxNxTxK, ((0, 0), (0, 0), (0, extra), (0, 0))) if extra else x_BxNxTxK


def _padded_segment_ids(b: int, t: int, s: int, t_pad: int, s_pad: int, causal: bool,
                        segment_ids_BxT: jax.Array | None) -> splash.SegmentIds | None:
  """Segment ids (B, T_pad) / (B, S_pad) over the padded lengths, or None when nothing needs them.

  Given ids (T == S) get a PAD_SEGMENT tail: the added queries see only the added keys. Causally a
  tail needs none (no real query sees a later key). Bidirectionally a key tail gets PAD_SEGMENT and
  every query id 0, so added queries see the real keys (some key in every row: no NaN, even in the
  backward pass, where a NaN row would poison dk and dv through a zero cotangent).
  """
  if segment_ids_BxT is not None:
    ids_BxTp = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, t_pad - t)),
                       constant_values=PAD_SEGMENT)
    return splash.SegmentIds(q=ids_BxTp, kv=ids_BxTp)
  if causal or s == s_pad:
    return None
  q_ids_BxTp = jnp.zeros((b, t_pad), jnp.int32)
  kv_ids_BxSp = jnp.broadcast_to(jnp.where(jnp.arange(s_pad) < s, 0, PAD_SEGMENT).astype(jnp.int32), (b, s_pad))
  return splash.SegmentIds(q=q_ids_BxTp, kv=kv_ids_BxSp)


def block_size(n: int) -> int:
  """The largest of BLOCK_CHOICES dividing n (a multiple of 128)."""
  return next(size for size in BLOCK_CHOICES if n % size == 0)


def _make_kernel(h: int, t: int, s: int, causal: bool, mqa: bool, interpret: bool):
  """A splash kernel over (H, T, K) queries, one static mask for all heads, forward and backward blocks.

  The mask is built from shapes only (numpy, at trace time; jax caches its block analysis); segment ids
  are passed per call.
  """
  mask_TxS = splash_mask.CausalMask((t, s)) if causal else splash_mask.FullMask((t, s))
  mask_HxTxS = splash_mask.MultiHeadMask([mask_TxS] * h)
  bq, bkv = block_size(t), block_size(s)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                             block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  make = splash.make_splash_mqa if mqa else splash.make_splash_mha
  return make(mask_HxTxS, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
