"""`jaxlm import` and `jaxlm export` of a GPT-2 124M-shaped checkpoint (random weights made here by
transformers; the interop extra), as a user runs them, against transformers' own load + save of the same folder.

  python benchmarks/interop.py [--repeats=3] [--dtype=float32|bfloat16]

Each figure is the median of --repeats wall times of the whole command (a fresh process: Python, JAX and
transformers start-up included), the commands alternating. The tokenizer is a byte-level BPE of 4,096 tokens
trained on the built-in fairy tales (GPT-2's own needs a download): the import reads it, the weights do not
depend on it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

REFERENCE = """
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
"""


def make_checkpoint(folder: str, dtype: str) -> None:
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel

  import hf_models

  model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, width 768, 1024 positions, 50,257 tokens
  if dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  model.save_pretrained(folder)
  hf_models.tokenizer(["<|endoftext|>"], vocab_size=4096).save(os.path.join(folder, "tokenizer.json"))


def timed(command: list[str]) -> float:
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()
  jaxlm = [sys.executable, "-m", "jaxlm.cli"]
  with tempfile.TemporaryDirectory() as root:
    source = os.path.join(root, "gpt2")
    make_checkpoint(source, args.dtype)
    size = os.path.getsize(os.path.join(source, "model.safetensors"))
    times = {"jaxlm import": [], "jaxlm export": [], "transformers load + save": []}
    for i in range(args.repeats):
      workdir, out, ref = (os.path.join(root, f"{kind}{i}") for kind in ("w", "out", "ref"))
      times["jaxlm import"].append(timed([*jaxlm, "import", f"--from={source}", f"--workdir={workdir}"]))
      times["jaxlm export"].append(timed([*jaxlm, "export", f"--workdir={workdir}", f"--to={out}",
                                          f"--dtype={args.dtype}"]))
      times["transformers load + save"].append(timed([sys.executable, "-c", REFERENCE, source, ref]))
  print(f"GPT-2 124M-shaped checkpoint, {size / 2**20:,.0f} MiB of {args.dtype}; median of {args.repeats} "
        "(whole commands, start-up included)")
  reference = statistics.median(times["transformers load + save"])
  for name, values in times.items():
    median = statistics.median(values)
    print(f"  {name:<26} {median:6.2f} s  ({median / reference:.2f}x transformers' load + save)")


if __name__ == "__main__":
  main()
