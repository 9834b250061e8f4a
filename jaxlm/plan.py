"""`jaxlm plan`: whether a training job fits its devices and how long it takes, without training.

It reports the model's size (from the abstract model state, checked against flops.params_count), its model
FLOPs per token (flops.py), the run's tokens, 6ND and the Chinchilla budget; the bytes per device of the
trainer's own train step compiled ahead of time for the planned mesh (aot.py), on this process's devices,
on N simulated CPU devices or on a TPU topology (libtpu's compiler, no TPU needed); and the step and run
time at an assumed MFU. Only `gather` compiles or starts a process; the rest are pure functions of its
facts.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

from jaxlm.errors import UserError, warn

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal tokens per parameter
GIB = 1 << 30
LIBTPU_HINT = "pip install -e '.[tpu]' (libtpu compiles for TPUs on a CPU-only host)"
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def require_libtpu() -> None:
  """--topology compiles with libtpu, an optional extra: a one-line error where it is absent."""
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise UserError("--topology needs libtpu (the TPU compiler), which is not installed", LIBTPU_HINT)


def child_env(devices: int | None, topology: str | None) -> dict[str, str]:
  """The environment of the compiling process: N CPU devices, or a CPU host compiling for a TPU topology."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).split()
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  if topology is not None:
    env["TPU_SKIP_MDS_QUERY"] = "1"  # (no metadata server to ask: this is not a TPU VM)
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def compile_elsewhere(config, devices: int | None, topology: str | None) -> dict:
  """aot.facts in a fresh process (`python -m jaxlm.aot`) with its own devices; its UserErrors come back."""
  from jaxlm.config import to_json

  request = json.dumps({"config": to_json(config), "topology": topology})
  done = subprocess.run([sys.executable, "-m", "jaxlm.aot"], input=request, capture_output=True, text=True,
                        env=child_env(devices, topology))
  lines = done.stdout.strip().splitlines()
  if done.returncode != 0 or not lines:
    raise RuntimeError(f"the planning process (python -m jaxlm.aot) failed with exit code {done.returncode}:\n"
                       f"{done.stderr[-4000:]}")
  out = json.loads(lines[-1])
  if "error" in out:
    raise UserError(out["error"], out["hint"])
  return out["facts"]


def gather(config, devices: int | None = None, topology: str | None = None) -> dict:
  """aot.facts of `config` on this process's devices (neither given), N simulated CPU devices or a TPU
  topology (each compiled in a process of its own)."""
  if devices is None and topology is None:
    import jax

    from jaxlm import aot

    return aot.facts(config, jax.devices())
  return compile_elsewhere(config, devices, topology)


def memory_total(analysis: dict) -> int:
  """Bytes one device holds while the step runs: its arguments and outputs (less the donated state the
  outputs reuse), temporaries and code (MaxText's sum)."""
  return (analysis["argument"] + analysis["output"] - analysis["alias"] + analysis["temp"]
          + analysis["generated_code"])


def report(facts: dict, *, mfu: float, topology: str | None = None, memory_per_device: float | None = None
           ) -> dict:
  """The plan (stable keys, README "Planning a run") from aot.facts; `memory_per_device` (bytes) replaces
  the devices' own figure."""
  params, steps, per_step = facts["params"], facts["steps"], facts["tokens_per_step"]
  tokens = steps * per_step
  analysis = facts["memory_analysis"]
  total = memory_total(analysis)
  memory, source = facts["memory_per_device"], facts["memory_source"]
  if memory_per_device is not None:
    memory, source = int(memory_per_device), "--memory_per_device"
  peak, devices = facts["peak_flops_per_device"], facts["devices"]
  step = facts["flops_per_token"] * per_step / (devices * peak * mfu) if peak else None
  chinchilla = CHINCHILLA_TOKENS_PER_PARAM * params
  keep = ("objective", "family", "vocab_size", "devices", "platform", "device_kind", "mesh", "params",
          "params_non_embedding", "params_formula", "flops_per_token", "tokens_per_step", "steps",
          "peak_flops_per_device", "peak_source", "batch_shapes")
  return {**{k: facts[k] for k in keep}, "topology": topology,
          "train_tokens": tokens, "train_flops": facts["flops_per_token"] * tokens,
          "train_flops_6nd": 6.0 * params * tokens, "chinchilla_tokens": chinchilla,
          "chinchilla_steps": math.ceil(chinchilla / per_step),
          "bytes_per_device": {**facts["bytes"], "temp": analysis["temp"], "total": total},
          "memory_analysis": analysis, "memory_per_device": memory, "memory_source": source,
          "fits": None if memory is None else total <= memory,
          "mfu": mfu, "step_seconds": step, "total_seconds": None if step is None else step * steps}


def plan(config, *, devices: int | None = None, topology: str | None = None, mfu: float = 0.4,
         memory_per_device_gib: float | None = None) -> dict:
  """The plan of `config` (see `report`), with a warning if the model's parameter count and flops.py's
  formula disagree (then the FLOPs figures are suspect too)."""
  if topology is not None:
    require_libtpu()
  memory = None if memory_per_device_gib is None else memory_per_device_gib * GIB
  out = report(gather(config, devices, topology), mfu=mfu, topology=topology, memory_per_device=memory)
  if out["params_formula"] != [out["params"], out["params_non_embedding"]]:
    warn(f"flops.params_count gives {out['params_formula']} parameters (total, non-embedding), the model has "
         f"{[out['params'], out['params_non_embedding']]}: its FLOPs figures may be off")
  return out


def size(n: float) -> str:
  """Bytes in binary units: '512 B', '1.5 KiB', '2.00 GiB'."""
  for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
  return f"{int(n)} B"


def duration(seconds: float) -> str:
  for unit, scale in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
    if seconds >= scale:
      return f"{seconds / scale:.1f} {unit}"
  return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def _where(r: dict) -> str:
  m = r["mesh"]
  on = f"topology {r['topology']}: " if r["topology"] else ""
  devices = f"{r['devices']} {r['device_kind'] if r['platform'] != 'cpu' else 'CPU'} device{'s' * (r['devices'] > 1)}"
  return f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} on {on}{devices}"


def _memory_lines(r: dict) -> list[str]:
  b, a = r["bytes_per_device"], r["memory_analysis"]
  if r["fits"] is None:
    verdict = f"available: unknown ({r['memory_source']}; give --memory_per_device=GiB)"
  else:
    verdict = (f"available: {size(r['memory_per_device'])} ({r['memory_source']}): "
               + ("fits" if r["fits"] else "DOES NOT FIT"))
  return [
      "memory per device (the train step compiled ahead of time for this mesh; XLA's memory analysis):",
      f"  parameters       {size(b['params']):>11}  this device's shards of the parameters",
      f"  optimizer state  {size(b['optimizer']):>11}  its shards of the optimizer's state (AdamW moments)",
      f"  batch            {size(b['batch']):>11}  its rows of one global batch",
      f"  temporaries      {size(b['temp']):>11}  activations, gradients and workspace of the step (XLA temp)",
      f"  total            {size(b['total']):>11}  arguments {size(a['argument'])} + outputs {size(a['output'])}"
      f" - donated {size(a['alias'])} + temporaries + code {size(a['generated_code'])}",
      f"  {verdict}"]


def _time_line(r: dict) -> str:
  if r["step_seconds"] is None:
    return f"time: unknown ({r['peak_source']})"
  per = r["peak_flops_per_device"]
  n = r["devices"]
  peak = (f"{per * n / 1e12:.3g} TFLOP/s shared by the {n} CPU device{'s' * (n > 1)}: {r['peak_source']}"
          if r["platform"] == "cpu" else f"{per / 1e12:.0f} TFLOP/s per device: {r['peak_source']}")
  return (f"time at {r['mfu']:.0%} MFU: {duration(r['step_seconds'])} per step, {duration(r['total_seconds'])} "
          f"for {r['steps']:,} steps (peak {peak})")


def describe(r: dict, source: str) -> str:
  """The plan as text: what each number is, one line each."""
  return "\n".join([
      f"{source}: objective {r['objective']} ({r['family']}, vocabulary {r['vocab_size']:,}); {_where(r)}",
      f"parameters       {r['params']:,} ({r['params_non_embedding']:,} without the embeddings)",
      f"model FLOPs      {r['flops_per_token']:.4g} per token, forward and backward (flops.py)",
      f"tokens per step  {r['tokens_per_step']:,} (data.batch_size x data.seq_len)",
      f"run              {r['steps']:,} steps = {r['train_tokens']:.3g} tokens; 6ND = {r['train_flops_6nd']:.3g} "
      f"FLOPs (model FLOPs x tokens = {r['train_flops']:.3g})",
      f"Chinchilla       {r['chinchilla_tokens']:.3g} tokens ({CHINCHILLA_TOKENS_PER_PARAM} per parameter) = "
      f"{r['chinchilla_steps']:,} steps at this batch",
      *_memory_lines(r), _time_line(r)])


def advice(config, state_first: bool) -> str:
  """What to change when the step does not fit: the state's remedies first when the parameters and optimizer
  state are the larger share, else the activations'."""
  m = config.mesh
  state = (f"shard the parameters and optimizer state over more devices (--config.mesh.fsdp, now {m.fsdp}, "
           f"or mesh.tensor, now {m.tensor})")
  activations = [f"fewer rows per device (a smaller data.batch_size, now {config.data.batch_size}, or more "
                 f"optim.grad_accum, now {config.optim.grad_accum})"]
  if config.model.remat != "full":
    activations.append("--config.model.remat=full (recompute each block's activations)")
  if config.model.dtype != "bfloat16":
    activations.append("--config.model.dtype=bfloat16")
  return "; ".join([state] + activations if state_first else activations + [state])


def check_fits(r: dict, config) -> None:
  """One error line with the numbers and what to change, when the step does not fit its devices."""
  if r["fits"] is not False:
    return
  b = r["bytes_per_device"]
  raise UserError(
      f"the train step needs {size(b['total'])} per device (parameters {size(b['params'])}, optimizer state "
      f"{size(b['optimizer'])}, temporaries {size(b['temp'])}), more than the {size(r['memory_per_device'])} "
      f"available ({r['memory_source']})", advice(config, state_first=b["params"] + b["optimizer"] > b["temp"]))
