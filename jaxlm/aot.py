"""The trainer's train step compiled ahead of time for a mesh, on abstract inputs, for `jaxlm plan`.

The config goes through the trainer's own checks and model sizing (config.validate, the objective's
checks, loop.model_for), then `compile_steps`' jitted train step is lowered on ShapeDtypeStructs that
carry the trainer's shardings (the state from `plan_train_state`, never allocated; a batch of exactly the
keys, shapes and dtypes the data paths and the objective give) and compiled. XLA's memory analysis of
that program is per device.

`python -m jaxlm.aot` is the process `jaxlm plan --devices=N | --topology=NAME` starts: a process's CPU
device count is fixed when JAX starts, and TPU topologies need their own setup. It reads
{"config": ..., "topology": ...} as JSON on stdin and prints one JSON line: {"facts": ...} or
{"error": ..., "hint": ...}.
"""

import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
from flax import nnx

from jaxlm import flops, hardware, objectives
from jaxlm.checkpoint import abstract_like
from jaxlm.errors import UserError
from jaxlm.loop import checked, model_for
from jaxlm.metrics import param_count
from jaxlm.models.transformer import ModelConfig
from jaxlm.objectives.base import TRAIN_STREAM
from jaxlm.parallel import batch_sharding, make_mesh
from jaxlm.train import compile_steps, plan_train_state

# The model's top-level parameters that are embeddings: the token table, the learned position table and an
# untied output layer (flops.params_count's "non-embedding" leaves them out).
EMBEDDINGS = ("embed", "pos_embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class Job:
  """A config resolved as the trainer resolves it, before anything compiles."""

  config: object  # ml_collections.ConfigDict, after config.resolved
  objective: objectives.base.Objective
  tokenizer: object
  pairs: tuple[str, str] | None  # a pairs store's fields (its rows carry loss weights), else None
  model_config: ModelConfig
  token_bytes: np.ndarray
  shape: tuple[int, int, int]  # (data, fsdp, tensor)


def data_tokenizer(data) -> tuple[object, tuple[str, str] | None, str]:
  """(tokenizer, pairs, source) of the configured data without reading its tokens: a store's own
  tokenizer (meta.json and tokenizer.json only); bytes for a text file or the built-in fairy tales."""
  from jaxlm.data.store import TokenStore, is_store
  from jaxlm.data.text import load_data
  from jaxlm.data.tokenizer import ByteTokenizer, load_tokenizer_json

  if data.path and is_store(data.path):
    store = TokenStore(data.path)
    return load_tokenizer_json(store.tokenizer_json, f"{data.path}/tokenizer.json"), store.pairs, data.path
  refused = data.path and (not os.path.isfile(data.path) or data.path.lower().endswith((".jsonl", ".gz")))
  if data.sequences == "packed" or refused:
    load_data(data)  # the trainer's error for these, raised before any text is read
  return ByteTokenizer(), None, data.path or "built-in fairy tales"


def resolve(config, num_devices: int) -> Job:
  """The trainer's checks and sizing of `config` for `num_devices` devices (UserErrors as it gives them)."""
  config, _, shape, objective = checked(config, num_devices)
  tokenizer, pairs, source = data_tokenizer(config.data)
  objective.check_data(pairs, source)
  model_config, token_bytes = model_for(config, tokenizer, tensor=shape[2])
  return Job(config, objective, tokenizer, pairs, model_config, token_bytes, shape)


def example_rows(job: Job) -> dict[str, np.ndarray]:
  """One global batch of rows as the data paths cut them for this job (windows, packed documents or
  packed pairs, with loss weights from a pairs store), cut by the data code itself from a split of one
  document of EOS tokens: only the keys, shapes and dtypes matter."""
  from jaxlm.data.packing import Packer
  from jaxlm.data.text import window_rows

  data, objective, eos = job.config.data, job.objective, job.tokenizer.EOS
  rows, batch = range(data.batch_size), data.batch_size
  if objective.packs_examples:  # one (input, target) example: a weight-0 token, then a weight-1 EOS
    tokens, weights = np.array([eos, eos], np.int32), np.array([0, 1], np.uint8)
    packer = objective.example_packer(np.array([0, 2]), weights, data, job.config.seed, TRAIN_STREAM)
    return packer.rows_from_array(rows, tokens, weights)
  length = objective.row_len(data)
  tokens = np.full(length + 1, eos, np.int32)
  weights = np.ones(length + 1, np.float32) if job.pairs is not None else None
  if data.sequences == "packed":
    return Packer(np.array([0, length + 1]), length, job.config.seed, eos).rows_from_array(rows, tokens, weights)
  return window_rows(tokens, np.zeros(batch, np.int64), length, weights)


def abstract_batch(job: Job, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch train_step gets (the objective's transform of the rows), as ShapeDtypeStructs."""
  to_batch = job.objective.transform(job.tokenizer, job.config.seed, TRAIN_STREAM, job.config.data)
  batch = to_batch(example_rows(job), 0, 0)
  return {k: jax.ShapeDtypeStruct(v.shape, jax.dtypes.canonicalize_dtype(v.dtype), sharding=sharding)
          for k, v in batch.items()}


def bytes_per_device(tree) -> int:
  """Bytes of one device's shards of every array of `tree` (ShapeDtypeStructs with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def param_counts(params) -> tuple[int, int]:
  """(total, non-embedding) parameters of a model's abstract state (a tied embedding counts once)."""
  def top_name(path) -> str:
    return str(getattr(path[0], "key", getattr(path[0], "name", "")))

  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  embedding = sum(math.prod(x.shape) for path, x in leaves if top_name(path) in EMBEDDINGS)
  total = param_count(params)
  return total, total - embedding


def memory_analysis(compiled) -> dict[str, int | None]:
  """XLA's per-device sizes of the compiled program, in bytes (peak: where the backend reports one)."""
  stats = compiled.memory_analysis()
  names = ("argument", "output", "alias", "temp", "generated_code")
  out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in names}
  peak = getattr(stats, "peak_memory_in_bytes", None)
  out["peak"] = None if peak is None else int(peak)
  return out


def compile_or_explain(lowered, config, state_bytes: int):
  """The compiled program; a compiler that finds it cannot fit the devices (XLA's TPU compiler checks
  HBM) is a UserError quoting XLA, with what to change."""
  from jaxlm.plan import advice, size

  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if not str(e).startswith("RESOURCE_EXHAUSTED"):
      raise
    said = str(e).strip().splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ").rstrip(".")
    raise UserError(f"the train step does not fit its devices: XLA: {said} (the state alone: {size(state_bytes)} "
                    "per device)", advice(config, state_first=False)) from None


def compile_train_step(job: Job, devices) -> dict:
  """The trainer's train step compiled for `devices` on abstract inputs: parameter counts, the state's and
  batch's bytes per device, and XLA's memory analysis."""
  config, rules = job.config, tuple(job.config.mesh.rules)
  mesh = make_mesh(job.shape, devices)
  with nnx.logical_axis_rules(rules):  # (outside the mesh: its few eager ops, the keys, run on the host even
    # when the mesh's devices are a TPU topology's, which compile but cannot run anything)
    setup, init, shardings = plan_train_state(config, job.model_config, job.token_bytes, mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    sharding = batch_sharding(mesh, rules)
    train, _ = compile_steps(setup, shardings, sharding)
    state, batch = abstract_like(jax.eval_shape(init), shardings), abstract_batch(job, sharding)
    compiled = compile_or_explain(train.lower(state, batch), config, bytes_per_device(state))
  total, non_embedding = param_counts(state.params)
  return {"params": total, "params_non_embedding": non_embedding,
          "batch_shapes": {k: [list(v.shape), v.dtype.name] for k, v in batch.items()},
          "bytes": {"params": bytes_per_device(state.params), "optimizer": bytes_per_device(state.opt_state),
                    "batch": bytes_per_device(batch)},
          "memory_analysis": memory_analysis(compiled)}


def device_facts(devices) -> dict:
  """What the devices are, their peak FLOP/s each (for CPU devices: the host's measured peak, shared) and
  their memory each (an accelerator's from hardware's table; CPU devices: the host's, shared)."""
  first = devices[0]
  peak, source = hardware.peak_flops_per_device(first)
  if first.platform == "cpu":
    memory = hardware.host_memory_bytes() // len(devices)
    memory_source = f"this host's memory shared by {len(devices)} CPU device{'s' * (len(devices) > 1)}"
  else:
    known = hardware.accelerator(first.device_kind)
    memory = None if known is None else known[1]
    memory_source = (f"{first.device_kind}'s memory" if known else f"unknown for {first.device_kind!r}")
  return {"devices": len(devices), "platform": first.platform, "device_kind": first.device_kind,
          "peak_flops_per_device": peak or None, "peak_source": source, "memory_per_device": memory,
          "memory_source": memory_source}


def facts(config, devices) -> dict:
  """Everything `jaxlm plan` reports that depends on compiling: the job on `devices`."""
  job = resolve(config, len(devices))
  objective, data, model_config = job.objective, job.config.data, job.model_config
  target_len = objective.decoder_len(data) if objective.family == "encoder-decoder" else 0
  formula = flops.params_count(model_config, objective.family)
  return {"objective": objective.name, "family": objective.family, "vocab_size": model_config.vocab_size,
          "mesh": dict(zip(("data", "fsdp", "tensor"), job.shape)), **device_facts(devices),
          **compile_train_step(job, devices),
          "params_formula": list(formula),
          "flops_per_token": flops.model_flops_per_token(model_config, objective.family, data.seq_len, target_len),
          "tokens_per_step": data.batch_size * data.seq_len, "steps": job.config.train.steps}


def topology_devices(name: str):
  """The compile-only devices of a TPU topology (libtpu's compiler; no TPU needed)."""
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(name, "tpu").devices
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    raise UserError(f"--topology={name}: libtpu does not know it ({str(e).strip().splitlines()[0][:160]})",
                    "name a TPU slice as GENERATION:SHAPE, e.g. v5e:2x2, v5p:4x4x4 or v6e:16x16") from None


def main() -> None:
  """The child process of `jaxlm plan`: a request on stdin, one JSON line on stdout."""
  from jaxlm.config import config_from_json

  request = json.load(sys.stdin)
  try:
    config = config_from_json(json.loads(request["config"]), "the planned config")
    devices = topology_devices(request["topology"]) if request["topology"] else jax.devices()
    out = {"facts": facts(config, devices)}
  except UserError as e:
    out = {"error": e.what, "hint": e.hint}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
