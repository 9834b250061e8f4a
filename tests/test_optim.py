import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import base_config
from jaxlm.optim import make_optimizer, warmup_cosine_schedule


def test_schedule_rises_linearly_peaks_at_end_of_warmup_and_ends_at_final_lr():
  f = warmup_cosine_schedule(1e-3, 1e-4, warmup_steps=100, total_steps=2000)
  lrs = np.array([float(f(s)) for s in range(2000)])
  np.testing.assert_allclose(np.diff(lrs[:101]), 1e-3 / 101, rtol=1e-4)  # linear
  assert lrs[0] > 0
  assert lrs.argmax() == 100 and np.isclose(lrs[100], 1e-3)
  assert np.all(np.diff(lrs[100:]) <= 1e-12)  # then never rises
  np.testing.assert_allclose(lrs[1999], 1e-4, rtol=1e-5)
  middle = 100 + (1999 - 100) / 2  # cosine: halfway between peak and final at the midpoint
  np.testing.assert_allclose(float(f(middle)), (1e-3 + 1e-4) / 2, rtol=1e-4)


def test_weight_decay_skips_vectors_and_shrinks_matrices():
  c = base_config().optim
  c.weight_decay, c.warmup_steps, c.clip_norm = 0.5, 0, 0.0
  tx, schedule = make_optimizer(c, total_steps=10)
  params = {"kernel": jnp.ones((3, 3)), "norm_scale": jnp.ones(3), "bias": jnp.ones(3)}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  lr = float(schedule(0))
  np.testing.assert_allclose(new["kernel"], 1 - lr * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new["norm_scale"], params["norm_scale"])
  np.testing.assert_array_equal(new["bias"], params["bias"])


def test_gradients_are_clipped_to_the_global_norm_before_adamw():
  c = base_config().optim
  c.warmup_steps = 0
  params = {"w": jnp.ones((2, 2))}
  grads = [{"w": jnp.full((2, 2), 50.0)}, {"w": jnp.array([[0.1, -0.2], [0.3, 0.05]])}]

  def two_updates(tx):
    state, out = tx.init(params), []
    for g in grads:
      update, state = tx.update(g, state, params)
      out.append(update["w"])
    return np.array(out)

  c.clip_norm = 1.0
  clipped = two_updates(make_optimizer(c, total_steps=10)[0])
  _, schedule = make_optimizer(c, total_steps=10)
  reference = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay))
  np.testing.assert_allclose(clipped, two_updates(reference), rtol=1e-6)
  c.clip_norm = 0.0  # off: Adam's second step now sees the huge first gradient in its moments
  assert not np.allclose(two_updates(make_optimizer(c, total_steps=10)[0])[1], clipped[1], rtol=1e-3)
