"""Encoder-decoder decoding speed: the self-attention KV cache and once-computed cross-attention keys and
values against recomputing the decoder over the whole prefix at every token; beam search against greedy.

  python benchmarks/translate.py [--new_tokens=256] [--batch=8] [--beams=4] [--repeats=3]

The model of configs/t5_tiny.py (4 + 4 blocks of width 128, bf16 matmuls, as shipped) with max_seq_len
raised to the generation length, random parameters, inputs of 64 random bytes, eos_id=-1 so no row
stops early (every method decodes exactly --new_tokens per row). The cache is jaxlm.translate.Translator
(greedy, and beam search with --beams). The baseline, written here, encodes once and computes the cross
keys and values once too, then runs the full decoder over a static buffer of --new_tokens positions for
each new token (causal, so the positions after the current one do not matter), compiled once as a
fori_loop. Greedy tokens of cache and baseline are compared. Each figure is the median of --repeats timed
calls after a compiling one, the methods alternating; JAX gets one CPU device.
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
from jaxlm.generate import Sampling  # noqa: E402
from jaxlm.models.encdec import EncoderDecoder, cross_mask  # noqa: E402
from jaxlm.models.transformer import ModelConfig  # noqa: E402
from jaxlm.translate import Translator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS = 256


def recompute(graphdef, new: int):
  """Greedy decoding without caches: the full decoder over the prefix buffer for every new token."""
  def run(params, tokens_BxS, segments_BxS):
    model = nnx.merge(graphdef, params)
    enc = model.encode(tokens_BxS, segments_BxS)
    kv, mask = model.cross_keys_values(enc), cross_mask(None, segments_BxS, tokens_BxS.shape[1])
    b = tokens_BxS.shape[0]
    buffer = jnp.zeros((b, new + 1), jnp.int32).at[:, 0].set(BOS)

    def step(i, buf):
      logits = model.decode(buf[:, :new], kv, mask)
      token = jnp.argmax(logits[:, i, :260], axis=-1).astype(jnp.int32)
      return buf.at[:, i + 1].set(token)

    return jax.lax.fori_loop(0, new, step, buffer)[:, 1:]
  return jax.jit(run)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--beams", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  c = load_config_file(os.path.join(ROOT, "configs", "t5_tiny.py"))
  c.model.max_seq_len = max(args.new_tokens, 64)
  cfg = ModelConfig.from_config(c.model, 384)
  graphdef, params = nnx.split(EncoderDecoder(cfg, rngs=nnx.Rngs(params=0)))
  inputs = [np.random.default_rng(i).integers(0, 256, 64).astype(np.int32) for i in range(args.batch)]
  translator = Translator(graphdef, params, cfg, eos_id=-1, start_id=BOS, vocab_limit=260)
  tokens, segments = np.stack(inputs), np.ones((args.batch, 64), np.int32)
  baseline = recompute(graphdef, args.new_tokens)
  greedy = Sampling(temperature=0.0)
  methods = {
      "cache, greedy": lambda: translator.translate(inputs, max_new_tokens=args.new_tokens, sampling=greedy),
      "recompute, greedy": lambda: baseline(params, tokens, segments),
      f"cache, beam {args.beams}": lambda: translator.translate(inputs, max_new_tokens=args.new_tokens,
                                                               beams=args.beams),
  }
  for fn in methods.values():
    fn()  # (compile each before any timing)
  seconds = {name: [] for name in methods}
  outs = {}
  for _ in range(args.repeats):
    for name, fn in methods.items():
      begin = time.perf_counter()
      outs[name] = jax.block_until_ready(fn())
      seconds[name].append(time.perf_counter() - begin)
  cached = np.stack(outs["cache, greedy"][0])
  same = np.array_equal(cached, np.asarray(outs["recompute, greedy"]))
  print(f"{args.batch} inputs of 64 tokens, {args.new_tokens} new tokens each, t5_tiny shape, 1 CPU device; "
        f"median of {args.repeats}:")
  med = {name: statistics.median(s) for name, s in seconds.items()}
  for name, t in med.items():
    print(f"  {name:22s} {t:8.3f} s  {args.batch * args.new_tokens / t:10,.0f} new tokens/s")
  print(f"cache / recompute speed-up: {med['recompute, greedy'] / med['cache, greedy']:.1f}x "
        f"(greedy tokens identical: {same}); beam {args.beams} / greedy time: "
        f"{med[f'cache, beam {args.beams}'] / med['cache, greedy']:.2f}x")


if __name__ == "__main__":
  main()
