"""What every objective shares: cross-entropy sums over weighted positions, and their summaries.

Sums, not means: microbatches, evaluation batches and processes add up exactly, and the mean is taken
once, over every counted position (`tokens`, the sum of the weights).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Random streams of a run's host-side randomness (masks, noise), so they never coincide.
TRAIN_STREAM, VAL_STREAM, EVAL_STREAM = 0, 1, 2


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """-log p(target) per position, in float32."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return log_z_BxT - target_logit_BxT


def cross_entropy_sums(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array | None,
                       token_bytes_V: jax.Array, accuracy: bool = False) -> dict[str, jax.Array]:
  """loss_sum, tokens (the weights' sum) and bytes of the weighted targets; `correct` (argmax hits)
  with `accuracy`. Weights mark the positions that count (1 everywhere when None)."""
  nll_BxT = token_cross_entropy(logits_BxTxV, targets_BxT)
  weights_BxT = jnp.ones_like(nll_BxT) if weights_BxT is None else weights_BxT.astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(nll_BxT * weights_BxT), "tokens": jnp.sum(weights_BxT),
          "bytes": jnp.sum(token_bytes_V[targets_BxT] * weights_BxT)}
  if accuracy:
    hits_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    sums["correct"] = jnp.sum(hits_BxT * weights_BxT)
  return sums


def step_metrics(sums: dict) -> dict:
  """A training line's rates from a step's sums (traced): loss and, where counted, accuracy."""
  tokens = jnp.maximum(sums["tokens"], 1.0)
  out = {"loss": sums["loss_sum"] / tokens}
  if "correct" in sums:
    out["accuracy"] = sums["correct"] / tokens
  return out


def summarize(total: dict[str, float]) -> dict[str, float]:
  """Evaluation results from sums added over batches: loss (nats per counted token), perplexity, bits
  per byte, accuracy where counted, and the number of counted tokens."""
  tokens = max(total["tokens"], 1.0)
  loss = total["loss_sum"] / tokens
  out = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
         "bits_per_byte": total["loss_sum"] / (np.log(2) * max(total["bytes"], 1.0))}
  if "correct" in total:
    out["accuracy"] = total["correct"] / tokens
  out["tokens"] = int(total["tokens"])
  return out


def model_inputs(batch: dict) -> dict:
  """The keyword arguments a model takes from a batch (packed rows' segment ids and positions)."""
  return {"segment_ids_BxT": batch.get("segment_ids"), "positions_BxT": batch.get("positions")}


def passthrough(rows: dict) -> dict:
  """What the data path describes per position and an objective keeps as it is."""
  return {k: rows[k] for k in ("segment_ids", "positions") if k in rows}


def with_article(family: str) -> str:
  """'a decoder', 'an encoder'."""
  return ("an " if family[0] in "aeiou" else "a ") + family


@dataclasses.dataclass(frozen=True)
class Objective:
  """The parts every objective module defines (see objectives/__init__.py)."""

  name: str
  family: str  # the model family: decoder | encoder | encoder-decoder
  prompt_kind: str  # what `jaxlm sample` does: continue | fill | translate

  def model(self, model_config, rngs):
    raise NotImplementedError

  def transform(self, tokenizer, seed: int, stream: int, data=None):
    raise NotImplementedError

  def loss_sums(self, model, batch: dict, token_bytes_V: jax.Array, dropout_key) -> dict:
    raise NotImplementedError

  def check_data(self, pairs, source: str) -> None:
    """Refuses (UserError) data this objective cannot train on or evaluate: `pairs` are a pairs store's
    fields (None for plain text), `source` names the data."""

  def check_config(self, config) -> None:
    """Refuses (UserError) settings this objective cannot train with (after config.validate)."""

  def row_len(self, data) -> int:
    """Tokens per row (after the context token) that the data paths cut for this objective."""
    return data.seq_len

  def extra_ids(self, data) -> int:
    """Ids this objective adds above the tokenizer's vocabulary (e.g. sentinels)."""
    return 0

  packs_examples = False  # (a class constant: True where `example_packer` gives the rows)

  def example_packer(self, offsets, weights, data, seed: int, stream: int, shuffle: bool = True):
    """A packer of a pairs store's whole examples for this objective's rows (seq2seq), or None: the
    data paths' own windows or packed documents (data.sequences)."""
    return None

  def summary(self, data) -> str:
    """What the start-up line says about this objective's rows ('' when nothing)."""
    return ""
