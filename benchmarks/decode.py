"""Decoding speed: the KV cache against recomputing the whole prefix at every token, and the time
`jaxlm sample` takes to its first new token.

  python benchmarks/decode.py [--repeats=3] [--new_tokens=256,1024] [--batches=1] [--sample_runs=3]

(1) The model of configs/default.py (bf16 matmuls, as shipped) with max_seq_len raised to fit the prompt
and the longest generation, random parameters, prompts of 16 random bytes, eos_id=-1 so no row stops
early. The cache is jaxlm.generate.Generator (prefill, then a compiled while_loop that feeds one token
per step). The baseline, written here, keeps the same static-shaped token buffer (the Generator's
width) and runs the full forward pass over all of it for each new token (causal, so the zeros after
the current position do not matter), compiled once as a fori_loop; the same vocabulary limit, sampling
and random keys as the Generator. Compile seconds are read from JAX's own compile events during the
first call (and any compile during a timed call is reported); the timed calls are medians of
`--repeats`, the methods alternating. "streamed" is the cache decoding 4 tokens per call with the tokens
fetched after each, as `jaxlm sample` does; all timed calls are greedy. The tokens of cache and recompute
are compared greedy and sampled at temperature 1 with the same keys (a random model's greedy text is
often one token repeated). JAX gets one CPU device (`--cpu_devices`): the Generator without a mesh uses
one anyway.
(2) `jaxlm sample` on a 20-step run of configs/default.py (as shipped: 2 CPU devices): seconds from
spawning the process to the prompt on stdout, to the first byte after it, and to exit; the import of jax
and of jaxlm.api in a fresh process as the floor; and, from one more run, the seconds JAX spent compiling.
The default run takes ~4 minutes on a 2-core machine, most of it the recompute baseline at 1024.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.api import load_config
from jaxlm.data.tokenizer import ByteTokenizer, padded_vocab_size
from jaxlm.generate import NEG, Generator, Sampling, choose
from jaxlm.models.decoder import GPT
from jaxlm.models.transformer import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPT_LENGTH = 16
STREAM_CHUNK = 16  # decoding steps per call when streaming, as jaxlm sample (jaxlm/api.py)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileLog:
  """JAX's compile events as they happen: seconds spent tracing, lowering and compiling, and what."""

  def __init__(self):
    self.seconds, self.compiled = 0.0, []
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
      self.seconds += duration
    if event == COMPILE_EVENTS[-1]:
      self.compiled.append(kwargs.get("fun_name", "?"))

  def reset(self) -> None:
    self.seconds, self.compiled = 0.0, []


def model_config(new_tokens: int) -> ModelConfig:
  """configs/default.py's model, with positions for the prompt and `new_tokens` (rounded up to 64)."""
  config = load_config(os.path.join(ROOT, "configs", "default.py"))
  config.model.max_seq_len = -(-(PROMPT_LENGTH + new_tokens) // 64) * 64
  return ModelConfig.from_config(config.model, padded_vocab_size(ByteTokenizer.vocab_size))


def recompute_decoder(graphdef: nnx.GraphDef, vocab_limit: int, new_tokens: int):
  """Decoding without a cache: one full forward over the whole (B, W) buffer per new token."""

  def decode(params, tokens_BxW, keys_B, temperature):
    model = nnx.merge(graphdef, params)
    allowed_V = jnp.arange(model.cfg.vocab_size) < vocab_limit

    def step(i, tokens_BxW):
      pos = PROMPT_LENGTH + i
      logits_BxWxV = model(tokens_BxW)
      last_BxV = jnp.where(allowed_V, jax.lax.dynamic_index_in_dim(logits_BxWxV, pos - 1, 1, False), NEG)
      step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, i)  # the Generator's keys
      new_B = choose(last_BxV, step_keys_B, temperature, jnp.int32(0), jnp.float32(1.0))
      return tokens_BxW.at[:, pos].set(new_B)

    out_BxW = jax.lax.fori_loop(0, new_tokens, step, tokens_BxW)
    return out_BxW[:, PROMPT_LENGTH:PROMPT_LENGTH + new_tokens]

  return jax.jit(decode)


def timed(fn, log: CompileLog) -> tuple[float, object]:
  """(seconds, result) of fn() until its result is ready; `log` then holds the compiles it caused."""
  log.reset()
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def measure_decoding(new_tokens: int, batch: int, repeats: int, log: CompileLog) -> dict:
  cfg = model_config(new_tokens)
  graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(params=0)))
  limit = ByteTokenizer.vocab_size
  generator = Generator(graphdef, params, cfg, eos_id=-1, vocab_limit=limit)
  prompts = list(np.random.default_rng(1).integers(0, 256, (batch, PROMPT_LENGTH)).astype(np.int32))
  width = cfg.max_seq_len  # = the Generator's buffer: prompt + new tokens, rounded up to 64
  buffer_BxW = np.zeros((batch, width), np.int32)
  buffer_BxW[:, :PROMPT_LENGTH] = np.stack(prompts)
  keys_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(batch, dtype=jnp.uint32))
  recompute = recompute_decoder(graphdef, limit, new_tokens)

  def run_cache(chunk: int = 0, temperature: float = 0.0):
    return np.stack(generator.generate(prompts, max_new_tokens=new_tokens, sampling=Sampling(temperature),
                                       seed=0, on_tokens=(lambda rows: None) if chunk else None, chunk=chunk))

  def run_recompute(temperature: float = 0.0):
    return np.asarray(recompute(params, jnp.asarray(buffer_BxW), keys_B, jnp.float32(temperature)))

  compile_s, tokens = {}, {}
  for name, fn in (("cache", run_cache), ("recompute", run_recompute)):
    _, tokens[name] = timed(fn, log)
    compile_s[name] = log.seconds
  # A random model's greedy text can be one token repeated: sampling (the same keys) is the stronger check.
  agreement = {"greedy": _agreement(tokens["cache"], tokens["recompute"]),
               "sampled": _agreement(run_cache(temperature=1.0), run_recompute(temperature=1.0))}
  times, recompiled = {"cache": [], "streamed": [], "recompute": []}, []
  for _ in range(repeats):
    for name, fn in (("cache", run_cache), ("streamed", lambda: run_cache(STREAM_CHUNK)), ("recompute", run_recompute)):
      times[name].append(timed(fn, log)[0])
      recompiled += [f"{name}: {f}" for f in log.compiled]
  return {"width": width, "compile_s": compile_s, "recompiled": recompiled, "agreement": agreement,
          "tokens_per_s": {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}}


def _agreement(a_BxN: np.ndarray, b_BxN: np.ndarray) -> str:
  """'yes' or where the first row to differ does, and how many distinct tokens there are."""
  same_B = np.cumprod(a_BxN == b_BxN, axis=1).sum(axis=1)
  verdict = "yes" if np.all(same_B == a_BxN.shape[1]) else f"no: from token {same_B.min()}"
  return f"{verdict} ({len(np.unique(a_BxN))} distinct)"


COMPILE_PROBE = """
import atexit, collections, json, sys
import jax
seconds = collections.Counter()
def on_event(event, duration, fun_name="?", **kwargs):
  if event in EVENTS:
    seconds["prefill" if "prefill" in fun_name else "decode" if "decode" in fun_name else "other"] += duration
jax.monitoring.register_event_duration_secs_listener(on_event)
atexit.register(lambda: print("COMPILE " + json.dumps(seconds), file=sys.stderr))
from jaxlm import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def read_until_exit(proc: subprocess.Popen, start: float, prompt: bytes) -> tuple[float, float, bytes]:
  """(seconds to the whole prompt, seconds to the first byte after it) on proc's unbuffered stdout."""
  received, to_prompt, to_first = b"", None, None
  while chunk := os.read(proc.stdout.fileno(), 1 << 16):
    now = time.monotonic() - start
    received += chunk
    if to_prompt is None and len(received) >= len(prompt):
      to_prompt = now
    if to_first is None and len(received) > len(prompt):
      to_first = now
  return to_prompt, to_first, received


def measure_sample(runs: int, prompt: str, new_tokens: int) -> dict:
  times = {"import jax": [], "import jaxlm.api": [], "prompt": [], "first": [], "exit": []}
  with tempfile.TemporaryDirectory() as workdir:
    subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", f"--config={ROOT}/configs/default.py",
                    f"--workdir={workdir}", "--config.train.steps=20", "--config.train.eval_every=20",
                    "--config.train.checkpoint_every=20", "--config.optim.warmup_steps=5",
                    "--config.train.sample_tokens=0"], cwd=ROOT, check=True, capture_output=True)
    for _ in range(runs):
      for module in ("jax", "jaxlm.api"):
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, check=True)
        times[f"import {module}"].append(time.monotonic() - start)
      start = time.monotonic()
      proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "sample", f"--workdir={workdir}",
                               f"--prompt={prompt}", f"--max_new_tokens={new_tokens}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
      to_prompt, to_first, received = read_until_exit(proc, start, prompt.encode())
      if proc.wait() != 0 or not received.startswith(prompt.encode()) or to_first is None:
        raise RuntimeError(f"jaxlm sample exited with {proc.returncode}, printing {received[:200]!r}")
      times["exit"].append(time.monotonic() - start)
      times["prompt"].append(to_prompt)
      times["first"].append(to_first)
    probe = subprocess.run([sys.executable, "-c", f"EVENTS = {COMPILE_EVENTS!r}\n" + COMPILE_PROBE, "sample",
                            f"--workdir={workdir}", f"--prompt={prompt}", f"--max_new_tokens={new_tokens}"],
                           cwd=ROOT, check=True, capture_output=True, text=True)
  compile_s = json.loads(probe.stderr.split("COMPILE ", 1)[1])
  return {**{name: statistics.median(values) for name, values in times.items()},
          **{f"compile {name}": compile_s.get(name, 0.0) for name in ("prefill", "decode", "other")}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--new_tokens", default="256,1024", help="comma-separated generation lengths")
  parser.add_argument("--batches", default="1",
                      help="comma-separated batch sizes; the recompute baseline at 8 x 1024 takes ~6 min a run")
  parser.add_argument("--cpu_devices", type=int, default=1, help="JAX CPU devices for (1); 0: JAX's default")
  parser.add_argument("--sample_runs", type=int, default=3, help="runs of `jaxlm sample` for (2); 0: skip")
  args = parser.parse_args()
  if args.cpu_devices > 0 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the first JAX operation
  log = CompileLog()

  print(f"## KV cache vs recomputing the prefix: configs/default.py model ({model_config(0).dtype} matmuls), "
        f"{jax.device_count()} CPU device(s) (--cpu_devices; the config ships 2), "
        f"prompt {PROMPT_LENGTH} tokens, greedy, medians of {args.repeats}")
  print(f"| batch | new tokens | buffer | cache tokens/s | streamed ({STREAM_CHUNK}/call) tokens/s | recompute tokens/s "
        "| speedup (cache/recompute) | compile s cache / recompute | same tokens, greedy | same tokens, T=1 |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  recompiled = []
  for batch in (int(b) for b in args.batches.split(",")):
    for new_tokens in (int(n) for n in args.new_tokens.split(",")):
      r = measure_decoding(new_tokens, batch, args.repeats, log)
      speed, compile_s, agree = r["tokens_per_s"], r["compile_s"], r["agreement"]
      print(f"| {batch} | {new_tokens} | {r['width']} | {speed['cache']:,.0f} | {speed['streamed']:,.0f} "
            f"| {speed['recompute']:,.1f} | {speed['cache'] / speed['recompute']:.1f}x "
            f"| {compile_s['cache']:.2f} / {compile_s['recompute']:.2f} "
            f"| {agree['greedy']} | {agree['sampled']} |", flush=True)
      recompiled += [f"batch {batch}, {new_tokens} tokens, {name}" for name in r["recompiled"]]
  print("recompilations during timed calls: " + ("; ".join(recompiled) if recompiled else "none"))

  if args.sample_runs > 0:
    prompt, new_tokens = "Once upon a time", 100
    s = measure_sample(args.sample_runs, prompt, new_tokens)
    print(f"\n## jaxlm sample: a 20-step configs/default.py run, --prompt={prompt!r} "
          f"--max_new_tokens={new_tokens}, medians of {args.sample_runs}")
    print("| from spawn to | seconds |")
    print("|---|---|")
    print(f"| `python -c 'import jax'` exits (floor) | {s['import jax']:.2f} |")
    print(f"| `python -c 'import jaxlm.api'` exits | {s['import jaxlm.api']:.2f} |")
    print(f"| prompt printed (imports, checkpoint load) | {s['prompt']:.2f} |")
    print(f"| first new token | {s['first']:.2f} |")
    print(f"| exit | {s['exit']:.2f} |")
    print(f"first new token after the prompt: {s['first'] - s['prompt']:.2f} s; "
          f"exit after the first new token: {s['exit'] - s['first']:.2f} s")
    print(f"compiling (one more run, JAX's compile events): prefill {s['compile prefill']:.2f} s "
          f"(before the first token), decode {s['compile decode']:.2f} s (after it), "
          f"other {s['compile other']:.2f} s")


if __name__ == "__main__":
  main()
