"""The optax chain: global-norm clipping, then AdamW on a warmup + cosine schedule.

Weight decay skips vectors (norm scales, biases): decaying them pulls norms toward zero for no gain.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def warmup_cosine_schedule(lr: float, final_lr: float, warmup_steps: int, total_steps: int):
  """The LR of the update at step s (0-based): a linear rise that peaks at s = warmup_steps, then a
  cosine that reaches final_lr at the last step, s = total_steps - 1. Step 0 already learns."""
  decay_steps = max(total_steps - 1 - warmup_steps, 1)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = lr * (s + 1.0) / (warmup_steps + 1.0)
    progress = jnp.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = final_lr + 0.5 * (lr - final_lr) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(s < warmup_steps, warm, cosine)

  return schedule


def decay_mask(params):
  """True for the matrices that get weight decay, False for vectors (norms and biases). A scanned
  stack's parameters have a leading `layers` axis (their logical names say so), which does not count."""
  def decayed(p) -> bool:
    names = p.get_metadata().get("out_sharding") if isinstance(p, nnx.Variable) else None
    return p.ndim - (names is not None and "layers" in names) >= 2
  return jax.tree.map(decayed, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  c = optim_config
  schedule = warmup_cosine_schedule(c.lr, c.final_lr, c.warmup_steps, total_steps)
  adamw = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                      mask=decay_mask)
  chain = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
  return optax.chain(*chain, adamw), schedule
