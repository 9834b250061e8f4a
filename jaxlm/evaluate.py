"""Evaluation of a whole token stream: every token after the first is predicted exactly once.

The stream is cut into consecutive windows of seq_len + 1 tokens that overlap by one (the last
target of a window is the first input of the next); the last window and the last batch are padded
with weight-0 positions. Loss sums, token and byte counts add up over batches into cross-entropy,
perplexity and bits per byte.
"""

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.objectives import causal_lm_loss_sums
from jaxlm.parallel import to_global_batch


def stream_batches(tokens: np.ndarray, seq_len: int, batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of batches covering the stream: inputs, targets, weights (B, T)."""
  windows = max(1, -(-(len(tokens) - 1) // seq_len))
  rows = batch_size // process_count
  for first in range(0, windows, batch_size):
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ("inputs", "targets")}
    batch["weights"] = np.zeros((batch_size, seq_len), np.float32)
    for row, w in enumerate(range(first, min(first + batch_size, windows))):
      piece = np.asarray(tokens[w * seq_len:w * seq_len + seq_len + 1], np.int32)
      n = len(piece) - 1
      batch["inputs"][row, :n], batch["targets"][row, :n] = piece[:-1], piece[1:]
      batch["weights"][row, :n] = 1.0
    yield {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def evaluate_tokens(graphdef: nnx.GraphDef, params: nnx.State, tokens: np.ndarray, token_bytes: np.ndarray,
                    *, seq_len: int, batch_size: int, sharding) -> dict[str, float]:
  """loss (nats per token), perplexity, bits_per_byte and the token count over the whole stream."""
  token_bytes = jnp.asarray(token_bytes, jnp.float32)

  @jax.jit
  def sums(params, batch):
    model = nnx.merge(graphdef, params)
    return causal_lm_loss_sums(model(batch["inputs"]), batch, token_bytes)

  total = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
  for batch in stream_batches(tokens, seq_len, batch_size, jax.process_index(), jax.process_count()):
    for k, v in jax.device_get(sums(params, to_global_batch(batch, sharding))).items():
      total[k] += float(v)
  loss = total["loss_sum"] / max(total["tokens"], 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)),
          "bits_per_byte": total["loss_sum"] / (np.log(2) * max(total["bytes"], 1.0)),
          "tokens": int(total["tokens"])}
