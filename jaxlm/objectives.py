"""Losses as pure functions of a batch and the model's outputs."""

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """-log p(target) per position, in float32."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return log_z_BxT - target_logit_BxT


def causal_lm_loss_sums(logits_BxTxV: jax.Array, batch: dict[str, jax.Array],
                        token_bytes_V: jax.Array) -> dict[str, jax.Array]:
  """Sums (not means) of loss, tokens and target bytes, so microbatches and evaluation batches add up.

  `weights` (optional, (B, T)) marks the positions that count; bytes turn nats into bits per byte.
  """
  nll_BxT = token_cross_entropy(logits_BxTxV, batch["targets"])
  weights_BxT = batch.get("weights", jnp.ones_like(nll_BxT))
  return {
      "loss_sum": jnp.sum(nll_BxT * weights_BxT),
      "tokens": jnp.sum(weights_BxT),
      "bytes": jnp.sum(token_bytes_V[batch["targets"]] * weights_BxT),
  }
