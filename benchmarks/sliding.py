"""Generation past the context: tokens/s of jaxlm's sliding window (generate.py: re-prefill the newest 3/4
of a full window, then cached steps) at 4x the model's positions, against its in-window figure and against
recomputing the cropped window (nanoGPT's rule: the newest max_seq_len tokens) for every token.

  python benchmarks/sliding.py [--repeats=3] [--times=4] [--batch=1]

The model of configs/default.py (128 positions, bf16 matmuls, as shipped), random parameters, prompts of
16 random bytes, eos_id=-1 so no row stops early. The recompute baseline, written here, keeps a static
buffer and runs the full forward over its newest 128 tokens for each new token, compiled once as a
fori_loop (so it pays no dispatch per token). Each figure is the median of --repeats timed greedy calls
after a compiling one, the methods alternating; JAX gets one CPU device.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm.configfile import load_config_file  # noqa: E402
from jaxlm.generate import Generator, Sampling  # noqa: E402
from jaxlm.models.decoder import GPT  # noqa: E402
from jaxlm.models.transformer import ModelConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recompute(graphdef, window: int, prompt_len: int, new: int, vocab: int):
  """Greedy decoding with the window cropped to its newest `window` tokens, a full forward per token."""
  def run(params, prompt_BxP):
    model = nnx.merge(graphdef, params)
    b = prompt_BxP.shape[0]
    buf = jnp.zeros((b, window + prompt_len + new), jnp.int32).at[:, window:window + prompt_len].set(prompt_BxP)

    def step(i, buf):  # (the buffer starts with `window` zeros so that every crop is a full-size slice)
      length = prompt_len + i
      start = jnp.maximum(length - window, 0)
      ctx_BxW = jax.lax.dynamic_slice_in_dim(buf, window + start, window, axis=1)
      logits = model(ctx_BxW)[:, jnp.minimum(length, window) - 1, :vocab]
      return buf.at[:, window + length].set(jnp.argmax(logits, -1).astype(jnp.int32))

    return jax.lax.fori_loop(0, new, step, buf)[:, window + prompt_len:]
  return jax.jit(run)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--times", type=int, default=4, help="new tokens as a multiple of the positions")
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  c = load_config_file(os.path.join(ROOT, "configs", "default.py"))
  cfg = ModelConfig.from_config(c.model, 384)
  window, plen = cfg.max_seq_len, 16
  graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(params=0)))
  prompts = [np.random.default_rng(i).integers(0, 256, plen).astype(np.int32) for i in range(args.batch)]
  generator = Generator(graphdef, params, cfg, eos_id=-1, vocab_limit=256)
  greedy, far = Sampling(temperature=0.0), args.times * window
  baseline = recompute(graphdef, window, plen, far, 256)
  methods = {
      f"sliding, {window - plen} new (in the window)": (window - plen, lambda: generator.generate(
          prompts, max_new_tokens=window - plen, sampling=greedy)),
      f"sliding, {far} new ({args.times}x the positions)": (far, lambda: generator.generate(
          prompts, max_new_tokens=far, sampling=greedy)),
      f"recompute the cropped window, {far} new": (far, lambda: jax.block_until_ready(
          baseline(params, jnp.asarray(np.stack(prompts))))),
  }
  times = {name: [] for name in methods}
  for _, fn in methods.values():
    fn()  # (compiles)
  for _ in range(args.repeats):
    for name, (_, fn) in methods.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  print(f"model of configs/default.py: {window} positions, batch {args.batch}, median of {args.repeats}")
  print("| method | time | new tokens/s |\n| --- | --- | --- |")
  for name, (n, _) in methods.items():
    median = statistics.median(times[name])
    print(f"| {name} | {median:.3f} s | {n * args.batch / median:,.0f} |")


if __name__ == "__main__":
  main()
