"""jaxlm/flops.py against the models themselves: its parameter count against the abstract parameters,
its FLOPs per token against XLA's count of the eval step, for each model family."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config

from jaxlm import objectives
from jaxlm.flops import model_flops_per_token, params_count
from jaxlm.metrics import flops_per_token, param_count
from jaxlm.models.transformer import ModelConfig
from jaxlm.parallel import batch_sharding, make_mesh
from jaxlm.train import compile_eval, plan_train_state

FAMILIES = {"clm": "decoder", "mlm": "encoder", "span": "encoder-decoder"}  # an objective of each family
TINY = ModelConfig(vocab_size=384, num_layers=2, num_heads=4, width=64, mlp_width=128, max_seq_len=32)
VARIANTS = {"default": {}, "use_bias": dict(use_bias=True), "layernorm": dict(norm="layernorm"),
            "swiglu": dict(mlp="swiglu"), "untied": dict(tie_embeddings=False),
            "learned": dict(position="learned"),
            "all": dict(use_bias=True, norm="layernorm", mlp="swiglu", tie_embeddings=False)}


def abstract_params(objective: str, cfg: ModelConfig):
  """The model's parameters as plan_train_state builds them (shapes only)."""
  make = lambda: objectives.get(objective).model(cfg, nnx.Rngs(params=jax.random.PRNGKey(0)))
  return nnx.split(nnx.eval_shape(make))[1]


# (Encoder-decoders have rotary positions only: check_config refuses learned ones.)
@pytest.mark.parametrize("objective, variant", [(o, v) for o in FAMILIES for v in VARIANTS
                                                if (o, v) != ("span", "learned")])
def test_params_count_is_the_models_parameter_count(objective, variant):
  cfg = dataclasses.replace(TINY, **VARIANTS[variant])
  params = abstract_params(objective, cfg)
  total, non_embedding = params_count(cfg, FAMILIES[objective])
  assert total == param_count(params)
  tables = [params[name] for name in ("embed", "pos_embed", "lm_head") if name in params]
  assert non_embedding == total - param_count(tables)


def xla_flops_per_token(objective: str, cfg: ModelConfig, input_len: int, target_len: int) -> float:
  """metrics.flops_per_token of the loop's eval step (one device) on a batch of 2 rows."""
  config = tiny_config()
  config.objective = objective
  mesh, rules = make_mesh((1, 1, 1), jax.devices()[:1]), tuple(config.mesh.rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    setup, init, shardings = plan_train_state(config, cfg, np.ones(cfg.vocab_size, np.float32), mesh)
    eval_step = compile_eval(setup, shardings.params, batch_sharding(mesh, rules))
    rows = lambda n: jnp.zeros((2, n), jnp.int32)
    decoded = target_len or input_len
    batch = {"inputs": rows(input_len), "targets": rows(decoded), "weights": jnp.ones((2, decoded))}
    if target_len:
      batch["decoder_inputs"] = rows(target_len)
    return flops_per_token(eval_step, jax.eval_shape(init).params, batch)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("objective", FAMILIES)
def test_model_flops_are_xlas_count_less_the_elementwise_work(objective, mlp):
  # Wide enough, and rows long enough, that every term of the formula is at least 3% of it: the
  # encoder-decoder's decoder self-attention (96 of 128 positions) and output layer are the smallest.
  cfg = ModelConfig(vocab_size=384, num_layers=2, num_heads=4, width=128, mlp_width=512, max_seq_len=128,
                    mlp=mlp)
  family = FAMILIES[objective]
  target_len = 96 if family == "encoder-decoder" else 0
  ratio = xla_flops_per_token(objective, cfg, 128, target_len) / model_flops_per_token(cfg, family, 128,
                                                                                     target_len)
  # XLA counts every product the formula counts (causal attention in full, as the formula does), so
  # never less; it adds the elementwise work (softmaxes, norms, GELU or SiLU, RoPE, the loss), measured
  # at 1.3% (swiglu) to 2.3% (the masked LM's accuracy too) here with jax 0.10. 3% keeps a margin for
  # XLA's accounting to move, and still fails if a term of 3% or more were left out (>= 4.5%) or
  # counted twice (< 1).
  assert 1.0 <= ratio < 1.03, ratio
