"""The encoder-decoder model and its decoding: masks (padding, packed examples), cached decoding against
the full decoder forward, beam search against greedy, and sharded parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import DEFAULT_RULES
from jaxlm.generate import Sampling
from jaxlm.models.encdec import EncoderDecoder, cross_mask
from jaxlm.models.transformer import ModelConfig
from jaxlm.parallel import make_mesh, state_shardings
from jaxlm.translate import Translator

CFG = ModelConfig(vocab_size=128, num_layers=2, num_heads=4, width=32, mlp_width=64, max_seq_len=32)
EOS, BOS = 1, 2
# Float32 sums of the same products in another order (cache vs full forward, another mesh): a few ulps of
# logits of magnitude ~1, so 1e-5 absolute is loose enough and far below any real difference (~1e-2).
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
  return EncoderDecoder(CFG, rngs=nnx.Rngs(params=0))


def _logits(model, inputs, decoder_inputs, **kw):
  return np.asarray(model(jnp.asarray(inputs), jnp.asarray(decoder_inputs),
                          **{k: jnp.asarray(v) for k, v in kw.items()}))


def test_encoder_padding_is_never_seen(model):
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, 128, (2, 12)).astype(np.int32)
  segments = np.ones((2, 12), np.int32)
  segments[:, 8:] = 0  # the last 4 positions are padding
  dec = rng.integers(3, 128, (2, 6)).astype(np.int32)
  before = _logits(model, inputs, dec, input_segment_ids=segments)
  inputs[:, 8:] = rng.integers(3, 128, (2, 4))
  after = _logits(model, inputs, dec, input_segment_ids=segments)
  np.testing.assert_array_equal(before, after)
  alone = _logits(model, inputs[:, :8], dec)  # the same input without padding at all
  np.testing.assert_allclose(before, alone, atol=TOL)


def test_a_packed_pair_gives_the_logits_it_gives_alone(model):
  rng = np.random.default_rng(1)
  a_in, b_in = rng.integers(3, 128, 7), rng.integers(3, 128, 9)
  a_out, b_out = rng.integers(3, 128, 4), rng.integers(3, 128, 5)
  inputs = np.concatenate([a_in, b_in, [0, 0]])[None].astype(np.int32)  # 16 positions, 2 of padding
  input_segments = np.array([[1] * 7 + [2] * 9 + [0, 0]], np.int32)
  input_positions = np.array([list(range(7)) + list(range(9)) + [0, 0]], np.int32)
  dec = np.concatenate([a_out, b_out, [0]])[None].astype(np.int32)
  target_segments = np.array([[1] * 4 + [2] * 5 + [0]], np.int32)
  target_positions = np.array([list(range(4)) + list(range(5)) + [0]], np.int32)
  packed = _logits(model, inputs, dec, input_segment_ids=input_segments, input_positions=input_positions,
                   target_segment_ids=target_segments, target_positions=target_positions)
  np.testing.assert_allclose(packed[0, :4], _logits(model, a_in[None], a_out[None])[0], atol=TOL)
  np.testing.assert_allclose(packed[0, 4:9], _logits(model, b_in[None], b_out[None])[0], atol=TOL)
  changed = inputs.copy()
  changed[0, :7] = rng.integers(3, 128, 7)  # the other example's input: example b must not notice
  again = _logits(model, changed, dec, input_segment_ids=input_segments, input_positions=input_positions,
                  target_segment_ids=target_segments, target_positions=target_positions)
  np.testing.assert_array_equal(again[0, 4:9], packed[0, 4:9])
  assert not np.allclose(again[0, :4], packed[0, :4])  # (and example a does notice its own input)


def test_cross_mask_shapes():
  segments = jnp.array([[1, 1, 2, 0]])
  assert cross_mask(None, None, 4).shape == (1, 1, 1, 4)
  np.testing.assert_array_equal(cross_mask(None, segments, 4)[0, 0, 0], [True, True, True, False])
  np.testing.assert_array_equal(cross_mask(jnp.array([[2, 0]]), segments, 4)[0, 0],
                                [[False, False, True, False], [False, False, False, False]])


def _translator(model, mesh=None, params=None):
  graphdef, state = nnx.split(model)
  return Translator(graphdef, state if params is None else params, CFG, eos_id=EOS, start_id=BOS,
                    vocab_limit=120, mesh=mesh)


def _full_logprobs(model, inputs, target):
  """Log-probabilities of `target`'s tokens from one full decoder forward over BOS + target."""
  dec = np.concatenate([[BOS], target[:-1]])[None].astype(np.int32)
  logits = _logits(model, inputs[None], dec)[0].copy()
  logits[:, 120:] = np.finfo(np.float32).min  # (the translator's vocab_limit)
  logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  return np.asarray(logp), np.asarray(logits)


INPUTS = [np.array([5, 9, 33, 7, EOS], np.int32), np.array([12, 40, 40, 3, 99, 100, 6, EOS], np.int32),
          np.array([77, EOS], np.int32)]


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_decoding_equals_the_full_forward(model, beams):
  translator = _translator(model)
  outs, logprobs = translator.translate(INPUTS, max_new_tokens=12, sampling=Sampling(temperature=0.0),
                                        beams=beams, alpha=0.6)
  for x, out, total in zip(INPUTS, outs, logprobs):
    target = np.append(out, EOS) if len(out) < 12 else out  # (it ended at EOS unless it ran to the end)
    logp, logits = _full_logprobs(model, x, target)
    chosen = logp[np.arange(len(target)), target]
    np.testing.assert_allclose(chosen.sum(), total, atol=1e-4)  # (a sum of 12 terms of ~1e-5 each)
    if beams == 1:  # greedy: each token is the full forward's argmax at its position
      np.testing.assert_array_equal(np.argmax(logits, axis=-1), target)


def test_one_beam_without_length_penalty_is_greedy(model):
  translator = _translator(model)
  greedy, greedy_logp = translator.translate(INPUTS, max_new_tokens=10, sampling=Sampling(temperature=0.0))
  beam, beam_logp = translator.translate(INPUTS, max_new_tokens=10, beams=1, alpha=0.0, search=True)
  for g, b in zip(greedy, beam):
    np.testing.assert_array_equal(g, b)
  wide, wide_logp = translator.translate(INPUTS, max_new_tokens=10, beams=4, alpha=0.0)
  assert np.all(wide_logp >= greedy_logp - 1e-5)  # (a wider beam finds at least greedy's log-probability)


def test_sampling_is_reproducible_and_batch_independent(model):
  translator = _translator(model)
  s = Sampling(temperature=1.0, top_k=20)
  batch, _ = translator.translate(INPUTS, max_new_tokens=8, sampling=s, seed=3)
  for i, x in enumerate(INPUTS):
    alone, _ = translator.translate([x], max_new_tokens=8, sampling=s, seed=3, sample_ids=[i])
    np.testing.assert_array_equal(alone[0], batch[i])


@pytest.mark.parametrize("shape", [(1, 2, 4)])  # (FSDP and tensor parallel at once)
def test_sharded_parameters_decode_the_same(model, shape):
  single, single_logp = _translator(model).translate(INPUTS, max_new_tokens=8, beams=2)
  graphdef, params = nnx.split(model)
  mesh = make_mesh(shape)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, state_shardings(params, mesh, DEFAULT_RULES))
  outs, logp = Translator(graphdef, sharded, CFG, eos_id=EOS, start_id=BOS, vocab_limit=120,
                          mesh=mesh).translate(INPUTS, max_new_tokens=8, beams=2)
  for a, b in zip(single, outs):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(logp, single_logp, atol=1e-4)


def test_untied_embeddings_have_their_own_output_layer(model):
  import dataclasses

  from jaxlm.metrics import param_count

  untied = EncoderDecoder(dataclasses.replace(CFG, tie_embeddings=False), rngs=nnx.Rngs(params=0))
  assert model.lm_head is None and untied.lm_head[...].shape == (32, 128)
  assert param_count(nnx.state(untied)) - param_count(nnx.state(model)) == 32 * 128
  x = np.array([[5, 6, 7]], np.int32)
  untied.lm_head[...] = jnp.zeros((32, 128))  # the logits come from the output layer, not the embedding
  np.testing.assert_array_equal(_logits(untied, x, x), 0.0)
