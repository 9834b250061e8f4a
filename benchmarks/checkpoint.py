"""What checkpoints cost: the training time a save takes (async), and resume against a cold start.

  python benchmarks/checkpoint.py [--repeats=3] [--steps=250] [--every=25]

Save stall, two ways, both over the median step time: (1) how long the save call holds the loop once
the step it saves is computed (median over the saves after the first, which also starts orbax up);
(2) the same run twice, saving every `--every` steps and only at the
end: the extra loop time over the extra saves, i.e. the stall plus the background write competing with
training for the CPU (on a 2-core machine whose cores both run XLA, that competition is most of it;
an accelerator host has cores to spare). Resume: seconds from starting `jaxlm train` to the first new step's line in
metrics.jsonl, on a workdir with a checkpoint against an empty one. Rows alternate and repeat; medians.
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
CONFIGS = {  # name -> (config file, overrides)
    "shakespeare_char (0.8M params)": ("shakespeare_char", []),
    "d384 L6 (10.7M params)": ("shakespeare_char", [
        "--config.model.width=384", "--config.model.num_heads=6", "--config.model.num_layers=6",
        "--config.model.mlp_width=1536", "--config.model.max_seq_len=256"]),
}


def command(config: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "jaxlm.cli", "train", f"--config={ROOT}/configs/{config}.py",
          f"--workdir={workdir}", "--config.train.sample_tokens=0", "--config.train.eval_batches=2",
          "--config.optim.warmup_steps=5", *overrides]


LOOP_PROBE = """
import json, sys
from jaxlm import cli, loop
args = cli.parse_train_flags(sys.argv[1:])
config, workdir = cli.train_config(args), args.workdir
cli._set_cpu_devices(config.mesh.cpu_devices)
print("RESULT " + json.dumps(loop.run(config, workdir, quiet=True)))
"""


def loop_result(config: str, overrides: list[str], steps: int, every: int) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    args = command(config, workdir, *overrides, f"--config.train.steps={steps}",
                   f"--config.train.eval_every={steps}", f"--config.train.log_every={steps}",
                   f"--config.train.checkpoint_every={every}")[3:]
    out = subprocess.run([sys.executable, "-c", LOOP_PROBE, *args[1:]], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
  return json.loads(out.split("RESULT ", 1)[1])


def seconds_to_first_new_step(config: str, overrides: list[str], workdir: str, steps: int) -> float:
  metrics = os.path.join(workdir, "metrics.jsonl")
  count = lambda: _read(metrics).count("\n") if os.path.exists(metrics) else 0
  before = count()
  begin = time.monotonic()
  proc = subprocess.Popen(command(config, workdir, *overrides, f"--config.train.steps={steps}",
                                  "--config.train.log_every=1", f"--config.train.eval_every={steps}",
                                  "--config.train.checkpoint_every=1000000"),
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while True:
    if count() > before:
      seconds = time.monotonic() - begin
      break
    if proc.poll() is not None:
      raise RuntimeError(f"jaxlm train exited with {proc.returncode} before a step")
    time.sleep(0.005)
  proc.wait()
  return seconds


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=250)
  parser.add_argument("--every", type=int, default=25)
  args = parser.parse_args()
  print("| config | median step | save call | in steps | extra loop time per save | in steps "
        "| cold start to step 1 | resume to first new step | resume / cold |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, (config, overrides) in CONFIGS.items():
    blocks, stalls, steps_s, cold, warm = [], [], [], [], []
    for _ in range(args.repeats):
      saving = loop_result(config, overrides, args.steps, args.every)
      quiet = loop_result(config, overrides, args.steps, args.steps)
      extra_saves = args.steps // args.every - 1
      stalls.append((saving["loop_seconds"] - quiet["loop_seconds"]) / extra_saves)
      blocks.append(saving["save_seconds"])
      steps_s += [saving["step_seconds"], quiet["step_seconds"]]
      with tempfile.TemporaryDirectory() as workdir:
        cold.append(seconds_to_first_new_step(config, overrides, workdir, 20))  # saves at 20
        warm.append(seconds_to_first_new_step(config, overrides, workdir, 40))
    step, stall = statistics.median(steps_s), statistics.median(stalls)
    block = statistics.median(blocks)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"| {name} | {step * 1e3:.1f} ms | {block * 1e3:.1f} ms | {block / step:.2f} "
          f"| {stall * 1e3:.1f} ms | {stall / step:.2f} | {c:.2f} s | {w:.2f} s | {w / c:.2f} |",
          flush=True)


if __name__ == "__main__":
  main()
