"""Orbax checkpoints of the whole TrainState under WORKDIR/checkpoints/<step>/, saved asynchronously.

Orbax writes each step to a temporary folder and renames it on commit, so a killed save never leaves
a step folder that looks complete. Restoring onto abstract arrays that carry shardings reshards.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Save, find and restore train states; keeps the newest `keep`."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts an async save; returns once the arrays are copied off the devices (donation-safe)."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, step: int, abstract_state):
    """abstract_state: a tree of jax.ShapeDtypeStruct with the shardings to restore onto."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def close(self) -> None:
    """Waits for pending saves."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` placed by `shardings`: the target of a (resharding) restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
