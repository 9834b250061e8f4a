import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.models.decoder import GPT
from jaxlm.models.transformer import ModelConfig
from jaxlm.models.layers import _transposed_equations, matmul


def make(**kw):
  cfg = ModelConfig(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=32, **kw)
  return GPT(cfg, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("variant", [dict(), dict(position="learned", norm="layernorm", mlp="swiglu",
                                                  use_bias=True, tie_embeddings=False)])
def test_changing_later_tokens_never_changes_earlier_logits(variant):
  model = make(**variant)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 260, (2, 24))
  logits = model(jnp.asarray(tokens))
  for t in (0, 7, 22):
    changed = tokens.copy()
    changed[:, t + 1:] = rng.integers(0, 260, changed[:, t + 1:].shape)
    other = model(jnp.asarray(changed))
    np.testing.assert_array_equal(other[:, : t + 1], logits[:, : t + 1])
    assert not np.allclose(other[:, t + 1:], logits[:, t + 1:])


def test_logits_have_one_float32_row_per_position():
  logits = make()(jnp.zeros((3, 10), jnp.int32))
  assert logits.shape == (3, 10, 384) and logits.dtype == jnp.float32


def test_transposed_equations_give_each_operands_gradient():
  assert _transposed_equations("btd,df->btf") == ("btf,df->btd", "btd,btf->df")


@pytest.mark.parametrize("eq, a_shape, b_shape", [("btd,df->btf", (2, 5, 8), (8, 6)),
                                                   ("bhqk,bhsk->bhqs", (2, 3, 5, 4), (2, 3, 5, 4))])
def test_bf16_matmul_and_its_gradients_match_float32(eq, a_shape, b_shape):
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
  loss = lambda dtype: lambda a, b: jnp.sum(jnp.sin(matmul(eq, a, b, dtype)))
  got = jax.grad(loss("bfloat16"), argnums=(0, 1))(a, b)
  want = jax.grad(loss("float32"), argnums=(0, 1))(a, b)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=0.1, rtol=0.05)  # bf16 keeps ~3 significant digits
    assert np.corrcoef(np.ravel(g), np.ravel(w))[0, 1] > 0.999


def test_bf16_model_tracks_the_float32_model():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 260, (2, 16)))
  full, half = make()(tokens), make(dtype="bfloat16")(tokens)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.05)


@pytest.mark.parametrize("t, heads, kv_heads, packed", [(256, 4, 4, False), (300, 4, 2, True), (384, 2, 1, True)])
def test_causal_attention_in_blocks_equals_the_whole_matrix(t, heads, kv_heads, packed):
  """From 2 x CAUSAL_BLOCK positions on, each query block attends to the keys up to its end only: the same
  outputs and gradients as softmax over the whole masked row (a context that is not a multiple of the
  block, grouped-query heads and packed documents included)."""
  from jaxlm.models.layers import CAUSAL_BLOCK, Mask, _attend, attend, attention_mask

  assert t >= 2 * CAUSAL_BLOCK
  kq, kk, kv, ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (2, heads, t, 16))
  k, v = (jax.random.normal(key, (2, kv_heads, t, 16)) for key in (kk, kv))
  segments = jnp.cumsum(jax.random.bernoulli(ks, 0.01, (2, t)), axis=1) + 1 if packed else None
  mask = Mask(attention_mask(t, segments, causal=True), segments)
  blocks = lambda q, k, v: attend(q, k, v, mask, "float32")
  whole = lambda q, k, v: _attend(q, k, v, mask.dense, "float32")
  # (float32 sums over 128 fewer or more exact zeros, in other orders: rounding-level differences only)
  np.testing.assert_allclose(blocks(q, k, v), whole(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  for got, want in zip(jax.grad(loss(blocks), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
