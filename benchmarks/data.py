"""The data path: `jaxlm prepare` throughput, and what the grain loader costs the training loop.

  python benchmarks/data.py [--prepare_mb=20] [--steps=200] [--repeats=3] [--skip_loader]

prepare: MB/s and tokens/s over generated fairy-tale files (one JSONL and many .txt), with the byte
tokenizer, a BPE tokenizer trained on the corpus (bpe:8192, training included) and that BPE tokenizer
given as a file (tokenizing only), 1 and 2 worker processes. Loader overhead: the same training loop
reading its batches from a prepared store through the grain pipeline, against the loop fed one preloaded
batch over and over; (store - preloaded) / preloaded median step time. Rows: configs/shakespeare_char.py
(on tinyshakespeare when ../shared/data has it) and the same model with a gpt2_124m-sized global batch
(32 x 1024). Each loop runs in its own process; rows alternate and repeat; medians.
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
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

LOOP_PROBE = """
import itertools, json, sys
from jaxlm import cli, loop
from jaxlm.data import text
mode, argv = sys.argv[1], sys.argv[2:]
args = cli.parse_train_flags(argv)
config, workdir = cli.train_config(args), args.workdir
cli._set_cpu_devices(config.mesh.cpu_devices)
if mode == "preloaded":
  real = text.Corpus.train_batches
  def preloaded(self, **kwargs):
    batch = next(real(self, **kwargs))
    class Same:
      step = 0
      def __next__(self): return batch
      def get_state(self): return b"{}"
    return Same()
  text.Corpus.train_batches = preloaded
print("RESULT " + json.dumps(loop.run(config, workdir, quiet=True)))
"""


def corpus(folder: str, megabytes: int) -> list[str]:
  from jaxlm.data.fairytales import generate_fairy_tales

  text = generate_fairy_tales(megabytes * 1_000_000, seed=0)
  half = len(text) // 2
  paths = []
  for i in range(10):  # half as .txt files
    part = text[i * half // 10:(i + 1) * half // 10]
    paths.append(os.path.join(folder, f"tale{i}.txt"))
    with open(paths[-1], "w") as f:
      f.write(part)
  paths.append(os.path.join(folder, "tales.jsonl"))  # half as JSONL, a paragraph per line
  with open(paths[-1], "w") as f:
    f.writelines(json.dumps({"text": paragraph}) + "\n" for paragraph in text[half:].split("\n\n"))
  return paths


def prepare_rows(megabytes: int) -> None:
  from jaxlm.data.prepare import prepare

  print("| prepare | workers | MB/s | tokens/s | tokens | seconds |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as folder:
    inputs = corpus(folder, megabytes)
    size = sum(os.path.getsize(p) for p in inputs)
    trained = os.path.join(folder, "store-bpe:8192-1", "tokenizer.json")  # written by the bpe:8192 row
    for name, tokenizer in (("byte", "byte"), ("bpe:8192", "bpe:8192"), ("bpe, tokenizer.json", trained)):
      for workers in (1, 2):
        begin = time.monotonic()
        meta = prepare(inputs, os.path.join(folder, f"store-{name}-{workers}"), tokenizer=tokenizer,
                       workers=workers, progress=False)
        seconds = time.monotonic() - begin
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        print(f"| {name} | {workers} | {size / 1e6 / seconds:.1f} | {tokens / seconds:,.0f} | "
              f"{tokens:,} | {seconds:.1f} |", flush=True)


def loop_step(mode: str, args: list[str]) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    out = subprocess.run([sys.executable, "-c", LOOP_PROBE, mode, f"--workdir={workdir}", *args], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
  return json.loads(out.split("RESULT ", 1)[1])["step_seconds"]


def loader_rows(steps: int, repeats: int) -> None:
  from jaxlm.data.prepare import prepare
  from jaxlm.data.store import TokenStore

  print("\n| loader | global batch | step, preloaded batch | step, grain from the store | overhead "
        "| loader alone, per batch |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as folder:
    source = SHAKESPEARE if os.path.exists(SHAKESPEARE) else corpus(folder, 2)[0]
    prepare([source], os.path.join(folder, "store"), val_fraction=0.1, progress=False)
    common = [f"--config={ROOT}/configs/shakespeare_char.py", f"--config.data.path={folder}/store",
              f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
              "--config.train.eval_batches=2", f"--config.train.checkpoint_every={steps}",
              "--config.train.sample_tokens=0", "--config.optim.warmup_steps=5"]
    long = max(5, steps // 40)  # its CPU steps take seconds
    rows = {"shakespeare_char": ("12 x 64", []),
            "shakespeare_char model, gpt2_124m batch": ("32 x 1024", [
                "--config.data.batch_size=32", "--config.data.seq_len=1024", "--config.model.max_seq_len=1024",
                f"--config.train.steps={long}", f"--config.train.eval_every={long}",
                "--config.optim.warmup_steps=1", f"--config.train.checkpoint_every={long}"])}
    for name, (shape, extra) in rows.items():
      pre, real = [], []
      for _ in range(repeats):
        pre.append(loop_step("preloaded", common + extra))
        real.append(loop_step("store", common + extra))
      p, r = statistics.median(pre), statistics.median(real)
      rows_, cols = map(int, shape.split(" x "))
      count = TokenStore(os.path.join(folder, "store")).meta["splits"]["train"]["tokens"]
      alone = loader_alone(os.path.join(folder, "store"), count, cols, rows_)
      print(f"| {name} | {shape} | {p * 1e3:.1f} ms | {r * 1e3:.1f} ms | {(r - p) / p:+.1%} | "
            f"{alone * 1e3:.2f} ms |", flush=True)


def loader_alone(path: str, count: int, seq_len: int, batch_size: int, n: int = 20) -> float:
  """Seconds per batch of the pipeline on its own (no training competing for the CPU)."""
  from jaxlm.data.pipeline import StoreBatches

  it = StoreBatches(path, count, seq_len=seq_len, batch_size=batch_size, seed=0)
  next(it)
  begin = time.monotonic()
  for _ in range(n):
    next(it)
  return (time.monotonic() - begin) / n


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--prepare_mb", type=int, default=20)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_loader", action="store_true", help="measure prepare only")
  args = parser.parse_args()
  prepare_rows(args.prepare_mb)
  if not args.skip_loader:
    loader_rows(args.steps, args.repeats)


if __name__ == "__main__":
  main()
