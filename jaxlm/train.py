"""TrainState, the pure train_step and eval_step, and sharded initialisation.

Nothing here touches files, clocks or the console: the loop in jaxlm/loop.py does. The NNX graph
definition and the optax transformation are static and closed over; the state is an explicit pytree.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import objectives
from jaxlm.models.transformer import ModelConfig
from jaxlm.objectives.base import Objective, step_metrics
from jaxlm.optim import make_optimizer
from jaxlm.parallel import constrain, state_shardings

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied so far
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2]; the key of step s is fold_in(rng, s)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the jitted functions close over: the model's structure and the optimizer."""

  graphdef: nnx.GraphDef
  model_config: ModelConfig
  objective: Objective
  tx: optax.GradientTransformation
  schedule: Callable[[Any], jax.Array]
  grad_accum: int
  token_bytes: jax.Array  # bytes of text per token id, for bits per byte


def _loss_sums(setup: Setup, params: nnx.State, batch: Batch, dropout_key) -> tuple[jax.Array, dict]:
  sums = setup.objective.loss_sums(nnx.merge(setup.graphdef, params), batch, setup.token_bytes, dropout_key)
  return sums["loss_sum"], sums


def _split_microbatches(batch: Batch, n: int) -> Batch:
  """(B, T) -> (n, B/n, T), microbatch m taking rows m, m+n, ...: every device keeps its rows."""
  def split(x_BxT):
    b = x_BxT.shape[0]
    x_NxMxT = x_BxT.reshape(b // n, n, *x_BxT.shape[1:]).swapaxes(0, 1)
    return constrain(x_NxMxT, (None, "batch", "seq"))
  return {k: split(v) for k, v in batch.items()}


def train_step(setup: Setup, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
  """One optimizer update from one global batch (accumulated over setup.grad_accum microbatches).

  The gradient is of the token-weighted mean loss over the whole batch, however it is split (a batch
  in which no position counts, e.g. windows inside SFT prompts, gives a zero gradient).
  """
  key = jax.random.fold_in(state.rng, state.step) if setup.model_config.dropout > 0 else None
  grad_fn = jax.grad(lambda p, b, k: _loss_sums(setup, p, b, k), has_aux=True)
  if setup.grad_accum == 1:
    grads, sums = grad_fn(state.params, batch, key)
  else:
    def accumulate(carry, xs):
      micro, i = xs
      g, s = grad_fn(state.params, micro, None if key is None else jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (g, s)), None

    micro = _split_microbatches(batch, setup.grad_accum)
    shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(setup.grad_accum)))
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**step_metrics(sums), "grad_norm": optax.tree.norm(grads), "lr": setup.schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(setup: Setup, params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
  """The objective's sums (loss, tokens, bytes, ...) on one batch, without dropout; the caller adds
  batches up (evaluate.py)."""
  return _loss_sums(setup, params, batch, None)[1]


def create_train_state(config, model_config: ModelConfig, token_bytes, mesh: Mesh
                       ) -> tuple[Setup, TrainState, TrainState]:
  """The setup, a fresh state built directly in its sharded layout, and the state's shardings.

  `config` is the full experiment config (objective, optim, train.steps, seed, mesh.rules). The same seed gives
  the same parameters on every mesh.
  """
  setup, init, shardings = plan_train_state(config, model_config, token_bytes, mesh)
  with nnx.logical_axis_rules(tuple(config.mesh.rules)):
    state = init()
  return setup, state, shardings


def plan_train_state(config, model_config: ModelConfig, token_bytes, mesh: Mesh):
  """(setup, init, shardings): `init()` builds the fresh sharded state; nothing is allocated before.

  A resumed run restores onto `jax.eval_shape(init)` placed by `shardings` instead of calling `init`.
  """
  rules = tuple(config.mesh.rules)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  params_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  objective = objectives.get(config.objective)
  make_model = lambda: objective.model(model_config, nnx.Rngs(params=params_key))
  graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model))
  setup = Setup(graphdef, model_config, objective, tx, schedule, config.optim.grad_accum,
                jnp.asarray(token_bytes, jnp.float32))

  def init() -> TrainState:
    params = nnx.split(make_model())[1]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=train_key)

  replicated = NamedSharding(mesh, PartitionSpec())
  param_shardings = state_shardings(abstract_params, mesh, rules)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(init).opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                         rng=replicated)
  return setup, jax.jit(init, out_shardings=shardings), shardings


def compile_steps(setup: Setup, shardings: TrainState, batch_sharding: NamedSharding):
  """train_step and eval_step jitted with in/out shardings; the state is donated (updated in place)."""
  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  # (partial, not a lambda: profiles and HLO dumps then name it jit_train_step)
  train = jax.jit(functools.partial(train_step, setup), in_shardings=(shardings, batch_sharding),
                  out_shardings=(shardings, replicated), donate_argnums=0)
  return train, compile_eval(setup, shardings.params, batch_sharding)


def compile_eval(setup: Setup, param_shardings, batch_sharding: NamedSharding):
  """eval_step jitted with in/out shardings: what the loop's evaluations and `jaxlm eval` both run."""
  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(functools.partial(eval_step, setup), in_shardings=(param_shardings, batch_sharding),
                 out_shardings=replicated)
