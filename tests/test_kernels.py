"""The splash attention kernel (Pallas interpret mode, on CPU) against a plain float32 attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jaxlm.config import DEFAULT_RULES
from jaxlm.errors import UserError
from jaxlm.models import kernels

B, H, K = 2, 4, 32
# Interpret mode computes in float32 like the reference, so they differ only by summation order:
# the kernel's online softmax rescales partial sums by exp(m_prev - m_next) block by block and
# reduces in another order than XLA's softmax and einsums. Measured over these cases: outputs within
# 1.2e-6 (|y| <= ~3), gradients within 5.7e-6 (|grad| up to ~10; they sum over up to 256 keys and H/G
# heads), i.e. a few ulps relative. TOL (atol and rtol) 2e-5 is ~170 float32 ulps at magnitude 1: loose
# for reordering, far below a masking or scaling bug (a 10% wrong scale moves y by 0.3).
TOL = 2e-5


def reference_attention(q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, causal, segment_ids_BxT):
  """jaxlm's attend in float32: q / sqrt(K), masked scores to finfo.min, softmax, query head h on
  key/value head h // (H/G); mask as layers.attention_mask (padding, id 0, sees padding)."""
  b, h, t, k = q_BxHxTxK.shape
  g, s = k_BxGxSxK.shape[1], k_BxGxSxK.shape[2]
  mask_Bx1xTxS = jnp.ones((1, 1, t, s), bool)
  if causal:
    mask_Bx1xTxS = mask_Bx1xTxS & jnp.tril(jnp.ones((t, s), bool))
  if segment_ids_BxT is not None:
    mask_Bx1xTxS = mask_Bx1xTxS & (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
  q_BxGxRxTxK = (q_BxHxTxK / math.sqrt(k)).reshape(b, g, h // g, t, k)
  hi = jax.lax.Precision.HIGHEST
  scores_BxGxRxTxS = jnp.einsum("bgrqk,bgsk->bgrqs", q_BxGxRxTxK, k_BxGxSxK, precision=hi)
  scores_BxGxRxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
  probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1)
  return jnp.einsum("bgrqs,bgsk->bgrqk", probs_BxGxRxTxS, v_BxGxSxK, precision=hi).reshape(b, h, t, k)


def two_documents_and_padding(t):
  """Row 0: documents of 40% and 45% of T then padding; row 1: 70% and 20% then padding."""
  rows = []
  for first, second in ((0.4, 0.45), (0.7, 0.2)):
    n1, n2 = int(first * t), int(second * t)
    rows.append([1] * n1 + [2] * n2 + [0] * (t - n1 - n2))
  return jnp.asarray(rows, jnp.int32)


def inputs(g, t, s=None):
  s = t if s is None else s
  key_q, key_k, key_v, key_dy = jax.random.split(jax.random.key(g * 1000 + t), 4)
  q_BxHxTxK = jax.random.normal(key_q, (B, H, t, K), jnp.float32)
  k_BxGxSxK = jax.random.normal(key_k, (B, g, s, K), jnp.float32)
  v_BxGxSxK = jax.random.normal(key_v, (B, g, s, K), jnp.float32)
  dy_BxHxTxK = jax.random.normal(key_dy, (B, H, t, K), jnp.float32)
  return q_BxHxTxK, k_BxGxSxK, v_BxGxSxK, dy_BxHxTxK


def output_and_grads(attention, q, k, v, dy):
  """attention(q, k, v) and the gradients of sum(y * dy) with respect to q, k, v, in one jit."""
  def run(q, k, v):
    y, pullback = jax.vjp(attention, q, k, v)
    return y, pullback(dy)
  return jax.jit(run)(q, k, v)


def assert_matches(causal, segmented, g, t, s=None):
  q, k, v, dy = inputs(g, t, s)
  segment_ids_BxT = two_documents_and_padding(t) if segmented else None
  kernel = lambda q, k, v: kernels.splash_attention(q, k, v, causal=causal, segment_ids_BxT=segment_ids_BxT,
                                                     interpret=True)
  reference = lambda q, k, v: reference_attention(q, k, v, causal, segment_ids_BxT)
  y, grads = output_and_grads(kernel, q, k, v, dy)
  y_ref, grads_ref = output_and_grads(reference, q, k, v, dy)
  assert y.shape == (B, H, t, K) and y.dtype == jnp.float32
  assert [x.shape for x in grads] == [q.shape, k.shape, v.shape]
  assert np.isfinite(np.asarray(y)).all()  # padding queries included
  np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=TOL)
  for name, grad, grad_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(grad, grad_ref, atol=TOL, rtol=TOL, err_msg=f"d{name}")


@pytest.mark.parametrize("g", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal, segmented", [(True, False), (False, False), (True, True)],
                         ids=["causal", "bidirectional", "causal-segments"])
def test_splash_matches_reference(causal, segmented, g):
  """T = 128: one kernel block, no padding."""
  assert_matches(causal, segmented, g, 128)


@pytest.mark.parametrize("causal, segmented", [(True, False), (True, True), (False, True)],
                         ids=["causal", "causal-segments", "bidirectional-segments"])
def test_splash_pads_to_block_multiple(causal, segmented):
  """T = 200 is padded to 256 (two 128 blocks: exercises the online softmax across blocks and the
  tail that real queries must not see; bidirectional without ids: test_splash_cross_attention_pads_keys)."""
  assert_matches(causal, segmented, 2, 200)


def test_splash_cross_attention_pads_keys():
  """Bidirectional T = 100 queries over S = 200 keys (padded to 128 and 256): the added keys are
  hidden by segment ids, the added queries see the real keys (no NaN reaches dk, dv)."""
  assert_matches(False, False, 2, 100, 200)


def test_splash_under_vmap():
  """An outer vmap (here over the batch, one row per call) batches the kernel like the inner one."""
  q, k, v, _ = inputs(2, 128)
  segment_ids_BxT = two_documents_and_padding(128)
  def one_row(q_HxTxK, k_GxTxK, v_GxTxK, ids_T):
    return kernels.splash_attention(q_HxTxK[None], k_GxTxK[None], v_GxTxK[None], causal=True,
                                    segment_ids_BxT=ids_T[None], interpret=True)[0]
  y = jax.jit(jax.vmap(one_row))(q, k, v, segment_ids_BxT)
  np.testing.assert_allclose(y, reference_attention(q, k, v, True, segment_ids_BxT), atol=TOL, rtol=TOL)


def test_splash_rejects_bad_shapes():
  q, k, v, _ = inputs(3, 128)
  with pytest.raises(ValueError, match="must divide"):
    kernels.splash_attention(q, k, v, causal=True, interpret=True)
  q, k, v, _ = inputs(2, 128)
  with pytest.raises(ValueError, match="T == S"):
    kernels.splash_attention(q, k[:, :, :64], v[:, :, :64], causal=True, interpret=True)


def test_block_size():
  assert [kernels.block_size(n) for n in (128, 256, 384, 512, 1024, 1536)] == [128, 256, 128, 512, 512, 512]


REPLICATED_KV = tuple(r for r in DEFAULT_RULES if r[0] != "kv_heads") + (("kv_heads", None),)


@pytest.mark.parametrize("g, shape, rules", [(2, (2, 2, 2), DEFAULT_RULES), (1, (2, 2, 2), DEFAULT_RULES),
                                             (2, (2, 2, 1), REPLICATED_KV)],
                         ids=["gqa", "mqa", "gqa-kv-rule-differs-on-tensor-1"])
def test_splash_on_a_mesh_runs_per_device(g, shape, rules):
  """Under a (data, fsdp, tensor) mesh the kernel runs on each device's rows and heads (shard_map): the
  same outputs and gradients as the unsharded reference, and no operand gathered onto every device (a
  single key/value head is replicated, its gradient summed over the tensor axis; key/value heads under
  another rule than the query heads are fine where the tensor axis has one device)."""
  from flax import nnx

  from jaxlm.parallel import logical_to_spec, make_mesh

  b, t = 4, 128
  keys = jax.random.split(jax.random.key(7 + g), 4)
  q, dy = (jax.random.normal(key, (b, H, t, K), jnp.float32) for key in (keys[0], keys[3]))
  k, v = (jax.random.normal(key, (b, g, t, K), jnp.float32) for key in keys[1:3])
  ids = jnp.concatenate([two_documents_and_padding(t)] * 2)
  mesh = make_mesh(shape, jax.devices()[: math.prod(shape)])
  kernel = lambda q, k, v: kernels.splash_attention(q, k, v, causal=True, segment_ids_BxT=ids, interpret=True)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    place = lambda x, names: jax.device_put(x, jax.NamedSharding(mesh, logical_to_spec(names, rules)))
    q, dy = place(q, ("batch", "heads", None, None)), place(dy, ("batch", "heads", None, None))
    k, v = (place(x, ("batch", "kv_heads" if g > 1 else None, None, None)) for x in (k, v))
    y, grads = output_and_grads(kernel, q, k, v, dy)
    def run(q, k, v):
      y, pullback = jax.vjp(kernel, q, k, v)
      return y, pullback(dy)
    compiled = jax.jit(run).lower(q, k, v).as_text("hlo")
  assert "all-gather" not in compiled
  assert y.sharding.spec == logical_to_spec(("batch", "heads", None, None), rules)
  y_ref, grads_ref = output_and_grads(lambda q, k, v: reference_attention(q, k, v, True, ids), *(
      np.asarray(x) for x in (q, k, v, dy)))
  np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=TOL)
  for name, grad, grad_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(grad, grad_ref, atol=TOL, rtol=TOL, err_msg=f"d{name}")


def test_splash_refuses_key_value_heads_sharded_unlike_the_query_heads(monkeypatch):
  from jaxlm.config import validate

  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # (validated as on a TPU host)

  config = tiny_config()
  config.model.attention, config.model.num_kv_heads = "splash", 2
  config.mesh.data, config.mesh.tensor = 4, 2
  config.mesh.rules = REPLICATED_KV
  with pytest.raises(UserError, match="model.attention=splash shards key/value heads as the query heads"):
    validate(config, 8)
