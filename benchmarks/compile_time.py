"""Compile time of the first train step against depth, scanned and unrolled, through `jaxlm train`.

  python benchmarks/compile_time.py [--layers=4,48] [--width=128] [--repeats=1]

Each run is `jaxlm train` of the default config with --config.train.steps=1 in a fresh process and
workdir; the figure is what the loop prints: "first step compiled and dispatched in S s". The table
ends with each layout's ratio of the deepest to the shallowest stack (the target: scanned within 1.5x).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_step_seconds(layers: int, width: int, scan: bool) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    out = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "train", f"--config={ROOT}/configs/default.py", f"--workdir={workdir}",
         "--config.train.steps=1", "--config.optim.warmup_steps=0", "--config.train.sample_tokens=0",
         "--config.train.eval_batches=1", "--config.data.fairytale_bytes=200000", "--config.mesh.data=-1",
         f"--config.model.num_layers={layers}", f"--config.model.width={width}",
         f"--config.model.mlp_width={4 * width}", f"--config.model.scan_layers={scan}"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
  return float(re.search(r"first step compiled and dispatched in ([\d.]+) s", out).group(1))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="4,48")
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  depths = [int(n) for n in args.layers.split(",")]
  print(f"{'layout':10s} " + " ".join(f"{d:>8d}L" for d in depths) + "   ratio")
  for scan in (True, False):
    seconds = [statistics.median(first_step_seconds(d, args.width, scan) for _ in range(args.repeats))
               for d in depths]
    print(f"{'scanned' if scan else 'unrolled':10s} " + " ".join(f"{s:8.1f}s" for s in seconds) +
          f"   {seconds[-1] / seconds[0]:.2f}x", flush=True)


if __name__ == "__main__":
  main()
