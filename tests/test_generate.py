"""Generation: the KV cache matches the full forward pass, sampling filters are exact, and the same
seed gives the same text in a batch, one prompt at a time, in chunks and on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import DEFAULT_RULES
from jaxlm.errors import UserError
from jaxlm.generate import Generator, Sampling, choose, filter_logits
from jaxlm.models.decoder import GPT, init_cache
from jaxlm.models.transformer import ModelConfig
from jaxlm.parallel import make_mesh, state_shardings

VOCAB, LIMIT, EOS = 384, 260, 257


def make_model(**kw):
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=64, **kw)
  model = GPT(cfg, rngs=nnx.Rngs(params=0))
  model.embed[...] = model.embed[...] * 20  # confident logits: no near-ties for float noise to flip
  graphdef, params = nnx.split(model)
  return cfg, model, graphdef, params


@pytest.fixture(scope="module")
def tiny():
  return make_model()


def prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("variant", [{}, {"position": "learned", "tie_embeddings": False, "use_bias": True}])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(variant):
  cfg, model, _, _ = make_model(**variant)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 24)), jnp.int32)
  full = model(tokens)
  prefix = 7
  positions = jnp.broadcast_to(jnp.arange(prefix), (2, prefix))
  logits, cache = model(tokens[:, :prefix], positions_BxT=positions, kv_cache=init_cache(cfg, 2, 32))
  np.testing.assert_allclose(logits, full[:, :prefix], rtol=1e-5, atol=1e-5)
  for t in range(prefix, 24):
    step, cache = model(tokens[:, t:t + 1], positions_BxT=jnp.full((2, 1), t), kv_cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def reference_greedy(model, prompt, n):
  """Greedy decoding by recomputing the whole prefix with the full forward pass (no cache)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def next_token(tokens_T, last):  # (causal: the zeros after `last` do not change its logits)
    logits = nnx.merge(graphdef, params)(tokens_T[None])[0, last]
    return jnp.argmax(jnp.where(jnp.arange(VOCAB) < LIMIT, logits, -jnp.inf))

  tokens = np.zeros(model.cfg.max_seq_len, np.int32)
  tokens[:len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    tokens[i] = next_token(tokens, i - 1)
  return tokens[len(prompt):len(prompt) + n]


def test_temperature_zero_is_greedy_decoding_of_the_full_forward(tiny):
  cfg, model, graphdef, params = tiny
  gen = Generator(graphdef, params, cfg, eos_id=-1, vocab_limit=LIMIT)
  batch = prompts([5, 12, 1])
  out = gen.generate(batch, max_new_tokens=20, sampling=Sampling(temperature=0.0))
  for p, o in zip(batch, out):
    np.testing.assert_array_equal(o, reference_greedy(model, p, 20))


def test_top_k_and_top_p_keep_exactly_their_tokens():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 50)) * 2, jnp.float32)
  order = np.argsort(-np.asarray(logits[0]))
  probs = np.asarray(jax.nn.softmax(logits[0]))
  for k, p in ((5, 1.0), (0, 0.6), (8, 0.5), (1, 1.0), (0, 1.0)):
    top = order[:k or 50]  # top-k first, then the nucleus of what is left, renormalized
    kept = probs[top] / probs[top].sum()
    before = np.cumsum(kept) - kept
    want = {int(t) for t, b in zip(top, before) if b < p}
    allowed = np.flatnonzero(np.asarray(filter_logits(logits, 1.0, k, p)[0]) > -1e30)
    assert set(allowed.tolist()) == want
    keys = jax.random.split(jax.random.PRNGKey(k), 4000)
    draws = np.asarray(jax.vmap(lambda key: choose(logits, key[None], 1.0, k, p)[0])(keys))
    assert set(draws.tolist()) <= want  # only the allowed tokens...
    if len(want) <= 10:
      assert set(draws.tolist()) == want  # ...and (when none is very unlikely) each of them
  assert len(want) == 50


def test_sampling_is_seeded_and_batches_and_chunks_do_not_change_the_text(tiny):
  cfg, _, graphdef, params = tiny
  gen = Generator(graphdef, params, cfg, eos_id=-1, vocab_limit=LIMIT)
  batch = prompts([3, 17, 9, 1], seed=2)
  hot = Sampling(temperature=4.0, top_k=50, top_p=0.95)  # (the x20 logits are peaked)
  together = gen.generate(batch, max_new_tokens=25, sampling=hot, seed=7)
  again = gen.generate(batch, max_new_tokens=25, sampling=hot, seed=7)
  other = gen.generate(batch, max_new_tokens=25, sampling=hot, seed=8)
  alone = [gen.generate([p], max_new_tokens=25, sampling=hot, seed=7, sample_ids=[i])[0]
           for i, p in enumerate(batch)]
  streamed = []
  chunked = gen.generate(batch, max_new_tokens=25, sampling=hot, seed=7, chunk=4,
                         on_tokens=lambda rows: streamed.append([len(r) for r in rows]))
  for a, b, c, d in zip(together, again, alone, chunked):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)
  assert any(not np.array_equal(a, o) for a, o in zip(together, other))
  assert all(len(r) == 25 for r in together) and max(int(t) for r in together for t in r) < LIMIT
  assert [s[0] for s in streamed] == [1, 5, 9, 13, 17, 21, 25]  # after the prefill, then every 4 steps


def test_a_row_stops_at_eos(tiny):
  cfg, _, graphdef, params = tiny
  batch = prompts([4, 6])
  free = Generator(graphdef, params, cfg, eos_id=-1, vocab_limit=LIMIT).generate(
      batch, max_new_tokens=12, sampling=Sampling(temperature=0.0))
  eos = int(free[0][5])
  first = int(np.flatnonzero(free[0] == eos)[0])
  stopped = Generator(graphdef, params, cfg, eos_id=eos, vocab_limit=LIMIT).generate(
      batch, max_new_tokens=12, sampling=Sampling(temperature=0.0))
  np.testing.assert_array_equal(stopped[0], free[0][:first])  # up to, without, the EOS
  hit = np.flatnonzero(free[1] == eos)
  np.testing.assert_array_equal(stopped[1], free[1][:hit[0]] if len(hit) else free[1])


def test_sharded_parameters_generate_the_same_text(tiny):
  cfg, _, graphdef, params = tiny
  batch = prompts([5, 11], seed=3)
  hot = Sampling(temperature=4.0, top_k=20)
  want = Generator(graphdef, params, cfg, eos_id=-1, vocab_limit=LIMIT).generate(
      batch, max_new_tokens=16, sampling=hot, seed=1)
  for shape in ((2, 2, 2), (1, 8, 1), (1, 2, 4)):
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
      sharded = jax.device_put(params, state_shardings(params, mesh, DEFAULT_RULES))
    gen = Generator(graphdef, sharded, cfg, eos_id=-1, vocab_limit=LIMIT, mesh=mesh)
    for a, b in zip(want, gen.generate(batch, max_new_tokens=16, sampling=hot, seed=1)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sampling": Sampling(temperature=-0.5)}, "temperature must be 0 or more"),
    ({"sampling": Sampling(top_p=0.0)}, r"top_p must be in \(0, 1\]"),
    ({"sampling": Sampling(top_p=1.5)}, r"top_p must be in \(0, 1\]"),
    ({"sampling": Sampling(top_k=-1)}, "top_k must be 0 or more"),
    ({"max_new_tokens": 0}, "max_new_tokens must be 1 or more, got 0"),
])
def test_bad_settings_are_refused(tiny, kwargs, message):
  cfg, _, graphdef, params = tiny
  gen = Generator(graphdef, params, cfg, eos_id=-1)
  with pytest.raises(UserError, match=message):
    gen.generate(prompts([10]), **{"max_new_tokens": 5, **kwargs})
  with pytest.raises(UserError, match="the prompt is 64 tokens, but the model has 64 positions"):
    gen.generate(prompts([64]), max_new_tokens=1)
