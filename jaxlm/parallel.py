"""Mesh from config, logical-axis rules, and the shardings of state and batch derived from them.

Parameters and activations are named with logical axes; the rules table in the config maps each name
to mesh axes. Data parallel, FSDP, tensor parallel and mixes are different tables, never code paths.
"""

import contextlib
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import MESH_AXES

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: tuple[int, int, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (Explicit axes break the NNX embedding gather)."""
  devices = jax.devices() if devices is None else devices
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
  """('batch', 'seq', 'act_embed') -> PartitionSpec(('data', 'fsdp'), None, None) under the rules.

  A name with no rule, or None, is not sharded. A mesh axis is used at most once per array.
  """
  if logical is None:
    return PartitionSpec()
  table = dict(rules)
  used, out = set(), []
  for name in logical:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names, under the rules in `nnx.logical_axis_rules`.

  Outside a mesh (a plain forward pass in a notebook) it does nothing.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, spmd.get_logical_axis_rules()))


def state_shardings(abstract_state, mesh: Mesh, rules: Rules):
  """NamedShardings for an nnx.State (or any tree of Variables) from their logical `out_sharding` names.

  Reads the metadata itself: `nnx.get_partition_spec` would apply whatever rules are in context.
  """
  def sharding(variable: nnx.Variable) -> nnx.Variable:
    names = variable.get_metadata().get("out_sharding")
    return variable.replace(NamedSharding(mesh, logical_to_spec(names, rules)))
  return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))


def to_global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global jax.Arrays laid out over the mesh (works for one or many hosts)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class Inference:
  """Where sampling and filling run: the parameters keep their sharding (FSDP, tensor parallel) under
  their rules, and the small batch is replicated over the mesh (`mesh` None: the default device)."""

  def __init__(self, mesh: Mesh | None, rules: Rules):
    self.mesh = mesh
    self.rules = tuple((name, None if name == "batch" else axes) for name, axes in rules)

  def context(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nnx.logical_axis_rules(self.rules))
    return stack

  def put(self, x) -> jax.Array:
    """A host array as a replicated global array (what every process passes in a multi-process run)."""
    if self.mesh is None:
      return jax.numpy.asarray(x)
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, PartitionSpec()), np.asarray(x))

  def fetch(self, x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0))  # replicated: every process has all of it


def all_agree(ok: bool) -> bool:
  """True on every process only if `ok` on every process (one small allgather when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def initialize_distributed() -> None:
  """Joins a multi-process run through JAX's own distributed runtime, when the environment says so.

  - `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i`: explicit, as
    `launch/local.py` and most cluster scripts set them;
  - `JAXLM_DISTRIBUTED=auto`: let JAX detect the cluster (Cloud TPU pod, SLURM, Open MPI);
  - neither: a single process.
  Must run before JAX starts its backends. A process that dies ends the others (peers.py).
  """
  env = os.environ
  if not env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAXLM_DISTRIBUTED") != "auto":
    return
  from jaxlm import peers

  peers.before_initialize()
  count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
  jax.distributed.initialize(num_processes=int(count) if count else None,
                             process_id=int(index) if index else None,
                             heartbeat_timeout_seconds=peers.heartbeat_seconds())
  peers.start()
