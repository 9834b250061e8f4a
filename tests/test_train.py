"""The step: gradient accumulation is exact, dropout is seeded by (seed, step), evaluation adds up."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from jaxlm.data.text import train_batch
from jaxlm import objectives
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.objectives.base import TRAIN_STREAM
from jaxlm.models.transformer import ModelConfig
from jaxlm.parallel import batch_sharding, make_mesh, to_global_batch
from jaxlm.train import compile_steps, create_train_state

TOKENS = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)


def one_step(config, shape=(2, 1, 1), step=0):
  mesh = make_mesh(shape, jax.devices()[: int(np.prod(shape))])
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(config.mesh.rules)):
    setup, state, shardings = create_train_state(
        config, ModelConfig.from_config(config.model, 384), np.ones(384), mesh)
    sharding = batch_sharding(mesh, tuple(config.mesh.rules))
    train, evaluate = compile_steps(setup, shardings, sharding)
    objective = objectives.get(config.objective)
    to_batch = objective.transform(ByteTokenizer(), 0, TRAIN_STREAM, config.data)
    batch = to_global_batch(to_batch(train_batch(TOKENS, step, seq_len=objective.row_len(config.data),
                                                 batch_size=config.data.batch_size, seed=0), step, 0), sharding)
    sums = jax.device_get(evaluate(state.params, batch))
    state, metrics = train(state, batch)
    return jax.device_get(metrics), jax.device_get(state.params), sums


@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_four_microbatches_of_three_give_the_same_update_as_one_batch_of_twelve(objective):
  c = tiny_config()
  c.objective = objective
  c.data.batch_size = 12
  # Adam's eps of 1e-8 turns a ~1e-9 gradient's rounding into an lr-sized update difference (measured on
  # span: 1 of 4096 entries of an attention output projection off by 2.1e-6); 1e-5 keeps it about the
  # accumulation, as in test_parallel.
  c.optim.eps = 1e-5
  whole_metrics, whole, _ = one_step(c)
  c.optim.grad_accum = 4
  accum_metrics, accumulated, _ = one_step(c)
  np.testing.assert_allclose(accum_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(accum_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  if objective != "clm":  # (the counted positions are few per microbatch: counts add up, not means)
    np.testing.assert_allclose(accum_metrics["accuracy"], whole_metrics["accuracy"], rtol=1e-6)


def test_evaluation_of_the_initial_params_matches_the_training_loss():
  metrics, _, sums = one_step(tiny_config())
  assert sums["tokens"] == 8 * 16 and sums["bytes"] == 8 * 16
  np.testing.assert_allclose(sums["loss_sum"] / sums["tokens"], metrics["loss"], rtol=1e-6)
  assert abs(metrics["loss"] - np.log(384)) < 0.1  # a fresh model is near uniform


def test_dropout_is_a_function_of_seed_and_step():
  c = tiny_config()
  c.model.dropout = 0.3
  first, _, _ = one_step(c)
  again, _, _ = one_step(c)
  assert first["loss"] == again["loss"]
  c.seed = 1  # other seed: other parameters and other dropout masks
  other, _, _ = one_step(c)
  assert other["loss"] != first["loss"]
