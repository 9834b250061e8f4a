"""CPU speed as a user gets it: `jaxlm train` (tokens_per_sec in its metrics.jsonl) beside the PyTorch
reference trainer (benchmarks/reference_torch.py) on the same shapes, as a share of this machine's fp32
matmul FLOP/s measured in the same run, medians of repeats.

  python benchmarks/cpu_speed.py [--repeats=3] [--before=REV] [--torch=/path/to/python-with-torch]
      [--without_mallopt] [--shapes=small,wide]

Shapes: `small` is configs/shakespeare_char.py (4 layers, width 128, context 64, batch 12); `wide` the same
config at 6 layers, width 384, context 256, batch 16. `--before=REV` also runs jaxlm as it was at a git
revision (a worktree of REV on PYTHONPATH, same packages), alternated with today's, so "before" and "after"
share the run. The fp32 peak is a 4096-square `jnp.dot` (median of 10), measured before each repeat and
after the last; the table divides by the median of these. Needs ../shared/data/tinyshakespeare.txt.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
WIDE = {"model.width": 384, "model.num_heads": 6, "model.num_layers": 6, "model.mlp_width": 1536,
        "data.seq_len": 256, "data.batch_size": 16, "model.max_seq_len": 256}
# (overrides, train steps, log_every): enough steps after the compiling one for three timed log lines
SHAPES = {"small": ({}, 400, 100), "wide": (WIDE, 50, 10)}


def fp32_peak(n: int = 4096, repeats: int = 10) -> float:
  """FLOP/s of an n x n fp32 jnp.dot on this machine, the median of `repeats` (in a fresh process)."""
  code = f"""
import time, statistics, jax, jax.numpy as jnp
x = jax.random.normal(jax.random.key(0), ({n}, {n}), jnp.float32)
dot = jax.jit(jnp.dot); dot(x, x).block_until_ready()
times = []
for _ in range({repeats}):
  t = time.perf_counter(); dot(x, x).block_until_ready(); times.append(time.perf_counter() - t)
print(2 * {n} ** 3 / statistics.median(times))
"""
  return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def model_flops_per_token(overrides: dict) -> float:
  """The model FLOPs per token jaxlm counts (flops.py: 6N + attention) for the shape."""
  from jaxlm.configfile import load_config_file
  from jaxlm.data.tokenizer import ByteTokenizer
  from jaxlm.flops import model_flops_per_token as count
  from jaxlm.loop import model_for

  config = load_config_file(os.path.join(ROOT, "configs", "shakespeare_char.py"))
  for key, value in overrides.items():
    section, name = key.split(".")
    setattr(config[section], name, value)
  return count(model_for(config, ByteTokenizer())[0], "decoder", config.data.seq_len)


def jaxlm_train(overrides: dict, steps: int, log_every: int, pythonpath: str | None, extra_env=None) -> float:
  """Median tokens/s of a `jaxlm train` run's timed training lines (each the median step since the last)."""
  with tempfile.TemporaryDirectory() as workdir:
    args = [sys.executable, "-m", "jaxlm.cli", "train", "--config=" + os.path.join(ROOT, "configs/shakespeare_char.py"),
            f"--workdir={workdir}/w", f"--config.data.path={DATA}", f"--config.train.steps={steps}",
            f"--config.train.log_every={log_every}", f"--config.train.eval_every={10 * steps}",
            f"--config.train.checkpoint_every={10 * steps}", "--config.train.sample_tokens=0",
            *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}), **(extra_env or {}))
    subprocess.run(args, env=env, check=True, capture_output=True, cwd=pythonpath or ROOT)
    with open(f"{workdir}/w/metrics.jsonl") as f:
      lines = [m for m in map(json.loads, f) if "loss" in m and m["tokens_per_sec"] > 0]
  return statistics.median(m["tokens_per_sec"] for m in lines)


def torch_train(python: str, overrides: dict, steps: int) -> float:
  o = {**SHAPES["small"][0], **overrides}
  shape = dict(layers=o.get("model.num_layers", 4), width=o.get("model.width", 128),
               heads=o.get("model.num_heads", 4), seq_len=o.get("data.seq_len", 64), batch=o.get("data.batch_size", 12))
  args = [python, os.path.join(ROOT, "benchmarks", "reference_torch.py"), f"--steps={steps}",
          *(f"--{k}={v}" for k, v in shape.items())]
  done = subprocess.run(args, check=True, capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_sec"]


def worktree(rev: str) -> str:
  path = os.path.join(tempfile.mkdtemp(), "before")
  subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
  return path


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--before", default=None, help="a git revision of jaxlm to run alongside, e.g. 1526d09")
  p.add_argument("--torch", default=None, help="a Python with torch for the reference trainer")
  p.add_argument("--shapes", default="small,wide")
  p.add_argument("--without_mallopt", action="store_true", help="also run jaxlm with JAXLM_MALLOPT=0 "
                 "(glibc's allocator as it comes), to measure what jaxlm/allocator.py pays")
  a = p.parse_args()
  if not os.path.exists(DATA):
    sys.exit(f"needs {DATA}")
  before = worktree(a.before) if a.before else None
  runners = {"jaxlm": lambda o, s, e: jaxlm_train(o, s, e, None)}
  if before:
    runners[f"jaxlm@{a.before}"] = lambda o, s, e: jaxlm_train(o, s, e, before)
  if a.without_mallopt:
    runners["jaxlm MALLOPT=0"] = lambda o, s, e: jaxlm_train(o, s, e, None, {"JAXLM_MALLOPT": "0"})
  if a.torch:
    runners["pytorch"] = lambda o, s, e: torch_train(a.torch, o, s)
  peaks = [fp32_peak()]
  results = {}
  started = time.time()
  for shape in a.shapes.split(","):
    overrides, steps, log_every = SHAPES[shape]
    for _ in range(a.repeats):
      peaks.append(fp32_peak())
      for name, run in runners.items():  # alternated: drift of the machine falls on every runner alike
        results.setdefault((shape, name), []).append(run(overrides, steps, log_every))
  peaks.append(fp32_peak())
  peak = statistics.median(peaks)
  print(f"fp32 4096-square jnp.dot: median {peak / 1e9:.0f} GFLOP/s of {' '.join(f'{x / 1e9:.0f}' for x in peaks)} "
        f"(one before each repeat, one after); {a.repeats} repeats, {time.time() - started:.0f} s")
  print(f"{'shape':6} {'trainer':18} {'tokens/s (runs)':>32} {'median':>8} {'GFLOP/s':>8} {'of peak':>8} {'vs torch':>9}")
  for shape in a.shapes.split(","):
    per_token = model_flops_per_token(SHAPES[shape][0])
    reference = statistics.median(results[(shape, "pytorch")]) if a.torch else None
    for name in runners:
      runs = results[(shape, name)]
      median = statistics.median(runs)
      ratio = f"{median / reference:.2f}x" if reference else "-"
      print(f"{shape:6} {name:18} {' '.join(f'{x:,.0f}' for x in runs):>32} {median:8,.0f} "
            f"{median * per_token / 1e9:8.1f} {median * per_token / peak:8.0%} {ratio:>9}")
  if before:
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before], check=False)


if __name__ == "__main__":
  main()
