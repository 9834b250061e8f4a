"""A stack of blocks, unrolled or scanned, each block rematerialised or not (`model.scan_layers`,
`model.remat`).

Unrolled, the blocks are an `nnx.List` (parameters `blocks/0/...`, `blocks/1/...`) and each is traced
and compiled on its own, so compile time grows with depth. Scanned, they are one Block whose parameters
carry a leading `layers` axis (`blocks/...`, of shape (L, ...)), applied by `jax.lax.scan`: one block is
compiled whatever the depth. Block i is initialised from its own key in both layouts, so a seed gives
the same parameters (stacked or not) and the same numbers.

Decoding with a KV cache runs layer by layer in both layouts (the block's parameters sliced out of the
stack): caches stay one (keys, values) pair per layer with the batch leading, which is what sampling
and beam search reorder and repeat.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# model.remat -> what a rematerialised block keeps for the backward pass (None: only its inputs).
REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul's output, attention's too
    "save_projections": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the weight matmuls only
}


def make_blocks(make_block: Callable[[nnx.Rngs], nnx.Module], n: int, scan: bool, key: jax.Array):
  """n blocks, block i initialised from fold_in(key, i): a list, or one Block of the blocks' parameters
  stacked on a leading axis (logically `layers`), made by vmapping the same initialisation over i, so
  that its compile time does not grow with depth either."""
  def rngs(i):
    return nnx.Rngs(params=jax.random.fold_in(key, i))

  if not scan:
    return nnx.List([make_block(rngs(i)) for i in range(n)])
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_block(rngs(0))))
  stacked = jax.vmap(lambda i: nnx.state(make_block(rngs(i))))(jnp.arange(n))

  def name_layers(v: nnx.Variable) -> nnx.Variable:
    names = v.get_metadata().get("out_sharding")
    return v if names is None else v.replace(v.get_value(), out_sharding=("layers", *names))

  return nnx.merge(graphdef, jax.tree.map(name_layers, stacked, is_leaf=_is_variable))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def is_scanned(blocks) -> bool:
  return not isinstance(blocks, nnx.List)


def each_layer(blocks, n: int) -> list:
  """The blocks one by one: the list itself, or layer i's parameters sliced out of the stack."""
  if not is_scanned(blocks):
    return list(blocks)
  graphdef, params = nnx.split(blocks)
  return [nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], params)) for i in range(n)]


def call_block(block, remat: str, x_BxTxD, key, mask, positions_BxT, cache=None, cross=None):
  """block(...), or under jax.checkpoint with the remat policy (the same numbers, less memory kept)."""
  if remat == "none":
    return block(x_BxTxD, key, mask, positions_BxT, cache, cross)
  graphdef, params = nnx.split(block)

  def pure(params, x_BxTxD, key, mask, positions_BxT, cache, cross):
    return nnx.merge(graphdef, params)(x_BxTxD, key, mask, positions_BxT, cache, cross)

  return jax.checkpoint(pure, policy=REMAT_POLICIES[remat])(params, x_BxTxD, key, mask, positions_BxT, cache,
                                                            cross)


def run(blocks, n: int, remat: str, x_BxTxD, keys: list, mask, positions_BxT, caches: list | None = None,
        cross: tuple | None = None) -> tuple[jax.Array, list]:
  """The n blocks in order; returns the output and each block's updated KV cache (or None).

  `cross` (an encoder-decoder's decoder): (the encoder's output (B, S, D), which each block projects
  to its keys and values, or a list of each block's precomputed (keys, values); the cross mask).
  """
  precomputed = cross is not None and isinstance(cross[0], list)
  if is_scanned(blocks) and caches is None and not precomputed:
    return _scan(blocks, remat, x_BxTxD, keys, mask, positions_BxT, cross), [None] * n
  new_caches = []
  for i, block in enumerate(each_layer(blocks, n)):
    layer_cross = None if cross is None else (cross[0][i] if precomputed else cross[0], cross[1])
    x_BxTxD, cache = call_block(block, remat, x_BxTxD, keys[i], mask, positions_BxT,
                                caches[i] if caches else None, layer_cross)
    new_caches.append(cache)
  return x_BxTxD, new_caches


def _scan(blocks, remat: str, x_BxTxD, keys: list, mask, positions_BxT, cross) -> jax.Array:
  graphdef, params = nnx.split(blocks)
  keys_L = None if keys[0] is None else jnp.stack(keys)

  def body(x_BxTxD, layer):
    params, key = layer
    y_BxTxD, _ = call_block(nnx.merge(graphdef, params), remat, x_BxTxD, key, mask, positions_BxT, None, cross)
    return y_BxTxD, None

  return jax.lax.scan(body, x_BxTxD, (params, keys_L))[0]
