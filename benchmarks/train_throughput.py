"""Training throughput: step time, tokens/s, compile time, model FLOP/s over this machine's fp32 matmul
FLOP/s (measured in the same run), and bytes per device from the compiled step's memory analysis.

  python benchmarks/train_throughput.py [--steps=200] [--rows=shakespeare,default,objectives,t5]

Each row runs in its own process (the CPU device count is fixed when JAX starts); the fp32 matmul peak
is measured before and after the rows, and the table divides by their median.

The `objectives` rows are what a user runs: `jaxlm train` of configs/bert_tiny.py (masked LM, an encoder)
and of configs/default.py at bert_tiny's batch (a causal LM, the decoder of the same shape), alternated
`--repeats` times; each figure is the median over repeats of the run's own median step time and model
FLOP/s (its last lines), and the table ends with their ratio. The `t5` rows do the same for
configs/t5_tiny.py (span corruption, an encoder-decoder) and a decoder of about as many parameters.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, config file, overrides, CPU devices, mesh, glibc malloc tunables)
ROWS = {
    "shakespeare": [
        ("shakespeare 1dev fp32", "shakespeare_char", {}, 1, (1, 1, 1), False),
        ("shakespeare 1dev fp32 +malloc", "shakespeare_char", {}, 1, (1, 1, 1), True),
        ("shakespeare 2dev fp32 +malloc", "shakespeare_char", {}, 2, (2, 1, 1), True),
        ("shakespeare 2dev bf16", "shakespeare_char", {"model.dtype": "bfloat16"}, 2, (2, 1, 1), False),
        ("shakespeare 2dev bf16 +malloc", "shakespeare_char", {"model.dtype": "bfloat16"}, 2, (2, 1, 1), True),
        ("shakespeare 2dev fsdp bf16 +malloc", "shakespeare_char", {"model.dtype": "bfloat16"}, 2, (1, 2, 1), True),
    ],
    "default": [
        ("default (as shipped) +malloc", "default", {}, 2, (2, 1, 1), True),
    ],
    "wide": [
        ("d384 L6 T256 B16 2dev bf16 +malloc", "shakespeare_char",
         {"model.width": 384, "model.num_heads": 6, "model.num_layers": 6, "model.mlp_width": 1536,
          "data.seq_len": 256, "data.batch_size": 16, "model.max_seq_len": 256,
          "model.dtype": "bfloat16"}, 2, (2, 1, 1), True),
    ],
}


def fp32_matmul_flops(n: int = 2048, repeats: int = 15) -> float:
  """The machine's fp32 matmul ceiling: median of jnp.dot and numpy at n x n, the better of the two."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  dot = jax.jit(jnp.dot)
  x = jnp.asarray(a)
  dot(x, x).block_until_ready()
  best = 0.0
  for fn in (lambda: dot(x, x).block_until_ready(), lambda: a @ a):
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    best = max(best, 2 * n**3 / statistics.median(times))
  return best


def measure_row(config_name: str, overrides: dict, mesh: tuple, steps: int) -> dict:
  """Runs in the child process: compile, then `steps` steps with one in flight; median step time."""
  import importlib.util

  import jax
  import numpy as np
  from flax import nnx

  from jaxlm.data.tokenizer import ByteTokenizer, padded_vocab_size
  from jaxlm.data.text import train_batch
  from jaxlm.metrics import flops_per_token
  from jaxlm.objectives.clm import next_token
  from jaxlm.models.transformer import ModelConfig
  from jaxlm.parallel import batch_sharding, make_mesh, to_global_batch
  from jaxlm.train import compile_steps, create_train_state

  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", f"{config_name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.update_from_flattened_dict(overrides)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  tok = ByteTokenizer()
  model_config = ModelConfig.from_config(c.model, padded_vocab_size(tok.vocab_size))
  tokens = np.random.default_rng(0).integers(0, 256, 1_000_000).astype(np.uint16)
  b, t = c.data.batch_size, c.data.seq_len
  mesh_ = make_mesh(mesh)
  rules = tuple(c.mesh.rules)
  with jax.set_mesh(mesh_), nnx.logical_axis_rules(rules):
    setup, state, shardings = create_train_state(c, model_config, np.ones(model_config.vocab_size), mesh_)
    sharding = batch_sharding(mesh_, rules)
    train, evaluate = compile_steps(setup, shardings, sharding)
    batches = [to_global_batch(next_token(train_batch(tokens, i, seq_len=t, batch_size=b, seed=0)), sharding)
               for i in range(8)]
    per_token = flops_per_token(evaluate, state.params, batches[0])
    start = time.perf_counter()
    compiled = train.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    state, metrics = train(state, batches[0])
    jax.block_until_ready(metrics)
    times, previous = [], metrics
    for i in range(steps):
      tick = time.perf_counter()
      state, metrics = train(state, batches[i % len(batches)])
      jax.block_until_ready(previous)  # one step in flight, as in the training loop
      previous = metrics
      times.append(time.perf_counter() - tick)
    jax.block_until_ready(previous)
  step = statistics.median(times)
  return {"step_ms": step * 1e3, "tokens_per_sec": b * t / step, "compile_s": compile_s,
          "flops": per_token * b * t / step, "bytes_per_device": per_device}


# (name, config file, overrides): `jaxlm train` runs compared side by side
OBJECTIVE_ROWS = [
    ("bert_tiny (mlm, encoder)", "bert_tiny", []),
    ("default at B=32 (clm, decoder)", "default", ["--config.data.batch_size=32"]),
]


# t5_tiny (4 encoder + 4 decoder blocks: 112 d^2 of block parameters) against a decoder of about as many
# parameters (9 blocks of 12 d^2), both at width 128, batch 16, 128 (input) positions.
T5_ROWS = [
    ("t5_tiny (span, encoder-decoder)", "t5_tiny", []),
    ("default with 9 layers (clm, decoder)", "default", ["--config.model.num_layers=9"]),
]
COMPARISONS = {"objectives": OBJECTIVE_ROWS, "t5": T5_ROWS}


def train_row(name: str, overrides: list[str], steps: int, workdir: str) -> dict:
  """One `jaxlm train` run: its median step time and model FLOP/s, as it reports them at the end."""
  import re
  import shutil

  shutil.rmtree(workdir, ignore_errors=True)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["GLIBC_TUNABLES"] = MALLOC
  out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", f"--config={ROOT}/configs/{name}.py",
                        f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.train.sample_tokens=0",
                        f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
                        *overrides], env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  found = re.search(r"median step ([\d.]+) ms, ([\d,]+) tokens/s, ([\d.]+) model GFLOP/s", out)
  params = re.search(r" of ([\d,]+) parameters;", out)
  return {"step_ms": float(found.group(1)), "tokens_per_sec": float(found.group(2).replace(",", "")),
          "gflops": float(found.group(3)), "params": float(params.group(1).replace(",", ""))}


def compare_objectives(steps: int, repeats: int, rows=OBJECTIVE_ROWS) -> None:
  import tempfile

  runs = {label: [] for label, _, _ in rows}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(repeats):
      for label, name, overrides in rows:
        runs[label].append(train_row(name, overrides, steps, os.path.join(tmp, "w")))
        print(f"  measured {label} (repeat {r + 1})", file=sys.stderr)
  med = {label: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for label, rs in runs.items()}
  print(f"`jaxlm train`, {steps} steps, median of {repeats} alternated runs:")
  print(f"{'run':40s} {'params':>10s} {'ms/step':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s}")
  for label, m in med.items():
    print(f"{label:40s} {m['params']:10,.0f} {m['step_ms']:8.1f} {m['tokens_per_sec']:9,.0f} {m['gflops']:8.1f}")
  (a, ma), (b, mb) = med.items()
  print(f"ratio {a} / {b}: step time {ma['step_ms'] / mb['step_ms']:.3f}, "
        f"model FLOP/s {ma['gflops'] / mb['gflops']:.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rows", default="shakespeare,default,objectives",
                      help=f"comma-separated: {', '.join(ROWS)}, {', '.join(COMPARISONS)}")
  parser.add_argument("--repeats", type=int, default=3, help="alternated runs per objectives row")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    name, overrides, mesh = json.loads(args.child)
    print(json.dumps(measure_row(name, overrides, tuple(mesh), args.steps)))
    return

  groups = args.rows.split(",")
  for name, rows in COMPARISONS.items():
    if name in groups:
      compare_objectives(args.steps, args.repeats, rows)
      groups.remove(name)
    if not groups:
      return
  peaks = [fp32_matmul_flops()]
  results = []
  for group in groups:
    for label, name, overrides, devices, mesh, malloc in ROWS[group]:
      env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
      env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
      if malloc:
        env["GLIBC_TUNABLES"] = MALLOC
      out = subprocess.run([sys.executable, __file__, f"--steps={args.steps}",
                            "--child=" + json.dumps([name, overrides, mesh])],
                           env=env, capture_output=True, text=True, check=True)
      results.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
      print(f"  measured {label}", file=sys.stderr)
  peaks.append(fp32_matmul_flops())
  peak = statistics.median(peaks)
  print(f"fp32 matmul peak (2048^2, before/after): {peaks[0] / 1e9:.0f} / {peaks[1] / 1e9:.0f} GFLOP/s")
  print(f"{'row':40s} {'ms/step':>8s} {'tokens/s':>9s} {'compile s':>9s} {'GFLOP/s':>8s} "
        f"{'/ fp32 peak':>11s} {'MB/device':>9s}")
  for label, r in results:
    print(f"{label:40s} {r['step_ms']:8.1f} {r['tokens_per_sec']:9,.0f} {r['compile_s']:9.2f} "
          f"{r['flops'] / 1e9:8.1f} {r['flops'] / peak:11.0%} {r['bytes_per_device'] / 2**20:9.1f}")


if __name__ == "__main__":
  main()
