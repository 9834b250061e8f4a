"""Checkpoints under WORKDIR/checkpoints/<step>/ that never lose work.

Each step holds the TrainState (`state/`, orbax, saved asynchronously) and the data iterator's state
of every process (`data/`). Orbax writes a step into a temporary folder and renames it on commit;
just before the rename, process 0 seals it with `jaxlm-manifest.json`: the size of every file (for
the step-level metadata that orbax rewrites on commit, only that it exists).

Orbax itself does not validate step folders, so restoring checks the newest step first: a step whose
files do not match its manifest, whose metadata is missing, or whose arrays fail to read is reported
in one warning naming its step and moved aside to `<step>.damaged` (nothing is deleted, and the step
number is free for training to save again); the next newest valid step is used instead. Only the
keep policy (the newest K, plus the best by validation loss) ever deletes a checkpoint.

Restoring onto abstract arrays that carry the current mesh's shardings reshards, so a run saved on
one mesh or device count continues on another.
"""

import glob
import json
import math
import os
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_policy

from jaxlm.errors import RunFailed, UserError, warn
from jaxlm.parallel import all_agree

MANIFEST = "jaxlm-manifest.json"
_TMP = ".orbax-checkpoint-tmp"


class Checkpoints:
  """Saves, validates and restores the train state and data iterator state of one workdir."""

  def __init__(self, workdir: str, keep: int, keep_best: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._saving: int | None = None
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    policies = [keep_policy.LatestN(n=keep)]
    if keep_best:
      policies.append(keep_policy.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                        keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep_policy.AnyPreservationPolicy(policies),
        best_fn=_val_loss, best_mode="min",  # (makes orbax write the metrics, so a restart knows them)
        enable_async_checkpointing=True, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, val_loss: float | None = None) -> bool:
    """Starts saving `state` and the iterator's position at `step`; the writing goes on in the background.

    In a single process, the state is copied to host memory here (waiting for the step that computes
    it; `state` may then be donated to the next step) and a background thread hands the copy to
    orbax. Only this thread touches the devices: on CPU meshes, device work from a second thread
    can starve a collective of threads and hang. With several processes, whose arrays span hosts,
    orbax copies each process's shards off the devices here, then writes in its own background
    thread. `val_loss` (measured at this step) ranks the step for the keep-best policy. A step that
    is already saved is left as it is (returns False).
    """
    self.wait()
    if step in self._manager.all_steps():
      return False
    if not all_finite(state):
      raise RunFailed(f"the state of step {step} holds non-finite values; it was not saved",
                      "lower --config.optim.lr; the checkpoints saved before are intact")
    data = _Position(data_iterator.get_state())
    metrics = {"step": step} if val_loss is None else {"step": step, "val_loss": float(val_loss)}
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(state)):
      host = jax.tree.map(lambda x: np.array(x, copy=True), state)
      self._thread = threading.Thread(target=self._save, args=(step, host, data, metrics),
                                      name=f"jaxlm-save-{step}", daemon=True)
      self._thread.start()
    else:
      self._save(step, state, data, metrics)
      self.wait()
    return True

  def _save(self, step: int, tree, data, metrics) -> None:
    try:
      self._manager.wait_until_finished()  # the seal callback needs to know which step it seals
      self._saving = step
      args = ocp.args.Composite(state=ocp.args.PyTreeSave(tree),
                                data=grain.checkpoint.CheckpointSave(data))
      self._manager.save(step, args=args, metrics=metrics)
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by wait()
      self._error = e

  def _seal(self) -> None:
    """Runs on process 0 after every process has written the step, before orbax commits it."""
    step, self._saving = self._saving, None
    folders = glob.glob(os.path.join(self.directory, f"{step}{_TMP}*"))
    folder = max(folders, key=os.path.getmtime) if folders else os.path.join(self.directory, str(step))
    write_manifest(folder, step)

  def wait(self, committed: bool = False) -> None:
    """Waits until the last save has handed its arrays to orbax (or, `committed`, is on disk).

    Raises the save's error if it failed.
    """
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error
    if committed:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves to be committed."""
    self.wait(committed=True)
    self._manager.close()

  def restore_latest(self, abstract_state, data_iterator):
    """The newest valid step restored onto `abstract_state` (and into `data_iterator`), or None.

    Returns (state, step). Damaged steps on the way are warned about and moved aside. A checkpoint
    whose shapes differ from `abstract_state` is not damage: it raises a UserError naming the array.
    """
    self._set_aside_leftovers()
    for step in reversed(self.steps()):
      problem, kind = step_problem(os.path.join(self.directory, str(step))), "damaged"
      if problem is None:
        try:
          check_shapes(self._manager.item_metadata(step)["state"], abstract_state,
                       f"checkpoint {self.directory}/{step}")
          restored = self._restore(step, abstract_state, data_iterator)
          if int(restored.step) != step:
            problem = f"it holds the state of step {int(restored.step)}"
          elif not all_finite(restored):
            problem, kind = "it holds non-finite values (saved by a run that diverged)", "nonfinite"
        except UserError:
          raise
        except Exception as e:  # noqa: BLE001 - any failure to read is damage; the message says which
          problem = f"it cannot be read ({_first_line(e)})"
      if not all_agree(problem is None):
        problem = problem or "another process could not read it"
      if problem is None:
        return restored, step
      self._set_aside(step, problem, kind)
    return None

  def _restore(self, step: int, abstract_state, data_iterator):
    folder = os.path.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    args = {"state": _restore_args(abstract_state)}
    if os.path.exists(os.path.join(folder, mine)):
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      saved = len(glob.glob(os.path.join(folder, "process_*.json")))
      warn(f"checkpoint step {step} holds the data iterator state of {saved} processes, not "
           f"{jax.process_count()}; the data order continues from the step instead")
    return self._manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def _set_aside(self, step: int, problem: str, kind: str = "damaged") -> None:
    moved = _free_name(os.path.join(self.directory, f"{step}.{kind}"))
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), moved)
    multihost_utils.sync_global_devices(f"jaxlm set aside {step}")
    self._manager.reload()
    earlier = [s for s in self.steps() if s < step]
    then = f"trying step {earlier[-1]}" if earlier else "no earlier checkpoint; starting fresh"
    what = f"is damaged: {problem}" if kind == "damaged" else problem.removeprefix("it ")
    warn(f"checkpoint step {step} {what}; moved it to {moved}; {then}")

  def _set_aside_leftovers(self) -> None:
    """Temporary folders of saves that never committed (the process died while writing)."""
    leftovers = sorted(glob.glob(os.path.join(self.directory, f"*{_TMP}*")))
    multihost_utils.sync_global_devices("jaxlm leftovers listed")
    for folder in leftovers:
      step = os.path.basename(folder).split(".", 1)[0]
      moved = _free_name(os.path.join(self.directory, f"{step}.incomplete"))
      if jax.process_index() == 0:
        os.rename(folder, moved)
      warn(f"checkpoint step {step} was never completed (its save was interrupted); moved its "
           f"temporary folder to {moved}")
    if leftovers:
      multihost_utils.sync_global_devices("jaxlm leftovers moved")


def _handlers() -> dict:
  # No compression: zstd saved ~7% of the bytes of float32 weights for twice the CPU time per save
  # (measured), and the CPU is what the training loop shares with the background writer.
  return {"state": ocp.PyTreeCheckpointHandler(use_compression=False),
          "data": grain.checkpoint.CheckpointHandler()}


def _restore_args(abstract, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore onto `abstract`'s shapes, dtypes and shardings (a different mesh reshards)."""
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), abstract)
  return ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial)


class _Position:
  """A data iterator's state captured at save time, in the form grain's checkpoint handler saves.

  Iterators give JSON bytes (ours, grain's DataLoader) or a dict (grain's dataset iterators).
  """

  def __init__(self, state: bytes | dict):
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=2).encode()

  def get_state(self) -> bytes:
    return self._state


def _val_loss(metrics) -> float:
  """The keep-best ranking: a step saved without an evaluation, or with a non-finite one (an older
  jaxlm saved those), is never the best."""
  value = metrics.get("val_loss", math.inf)
  return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


@jax.jit
def _finite(tree) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def all_finite(tree) -> bool:
  """Whether every float in the tree (device arrays, sharded or not, or numpy) is finite."""
  return bool(_finite(tree))


def write_manifest(folder: str, step: int) -> None:
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      files[os.path.relpath(path, folder)] = os.path.getsize(path)
  files.pop(MANIFEST, None)
  for name in [n for n in files if os.sep not in n]:  # step metadata orbax rewrites on commit
    files[name] = None
  tmp = os.path.join(folder, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": 1, "step": step, "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(folder, MANIFEST))


def step_problem(folder: str) -> str | None:
  """Why the step folder is not the one that was saved, or None if its files match its manifest."""
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      files = json.load(f)["files"]
  except FileNotFoundError:
    return f"{MANIFEST} is missing (the save did not finish)"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST} is unreadable ({_first_line(e)})"
  for name, size in sorted(files.items()):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      return f"{name} is missing"
    if size is not None and os.path.getsize(path) != size:
      return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
  return None


def check_shapes(saved, abstract, where: str, prefix: str = "") -> None:
  """Raises a UserError naming the first array whose saved shape differs from the wanted one."""
  saved_by_path = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = prefix + _path_name(path)
    have = saved_by_path.get(_path_name(path))
    if have is None:
      raise UserError(f"{where} has no array {name}",
                      "it was saved by a different model or jaxlm version; start a fresh --workdir")
    if tuple(have.shape) != tuple(want.shape):
      raise UserError(f"{where}: {name} has shape {tuple(have.shape)} there, {tuple(want.shape)} "
                      "here", "use the model settings the checkpoint was trained with")


def load_params(path: str, abstract_params):
  """Parameters only, from a workdir (newest valid step), WORKDIR/STEP or WORKDIR/checkpoints/STEP.

  For fine-tuning (`--config.init_from`), evaluation and sampling; returns (params, step).
  `abstract_params` carries the shapes and shardings to load onto; a shape mismatch is a UserError
  naming the parameter. A step that a run training in the workdir deletes (its keep policy) while
  it is being read is replaced by the newest again.
  """
  for attempt in range(3):
    directory, step = resolve_checkpoint(path)
    folder = os.path.join(directory, str(step))
    try:
      return _read_params(directory, step, abstract_params), step
    except (UserError, ValueError, OSError):
      if os.path.isdir(folder) or attempt == 2:
        raise
  raise AssertionError("unreachable")


def _read_params(directory: str, step: int, abstract_params):
  folder = os.path.join(directory, str(step))
  if (problem := step_problem(folder)) is not None:
    raise UserError(f"checkpoint {folder} is damaged: {problem}", "choose another step")
  options = ocp.CheckpointManagerOptions(create=False)  # (read_only=True logs three warnings)
  with ocp.CheckpointManager(directory, options=options, item_handlers=_handlers()) as m:
    saved = m.item_metadata(step)["state"]
    check_shapes(saved["params"], abstract_params, f"checkpoint {folder}", prefix="params/")
    restored = m.restore(step, args=ocp.args.Composite(state=_restore_args(
        {"params": abstract_params}, partial=True)))  # reads the params only
  params = restored["state"]["params"]
  if not all_finite(params):
    raise UserError(f"checkpoint {folder} holds non-finite parameters (saved by a run that diverged)",
                    "give an earlier --step")
  return params


def resolve_checkpoint(path: str, quiet: bool = False) -> tuple[str, int]:
  """(checkpoints directory, step) for WORKDIR, WORKDIR/STEP or WORKDIR/checkpoints[/STEP].

  Without a step, the newest valid one; newer damaged ones are named in one warning (unless `quiet`).
  """
  path = os.path.abspath(path.rstrip("/"))
  head, tail = os.path.split(path)
  step = None
  if tail.isdigit() and not os.path.isdir(os.path.join(path, "checkpoints")):
    path, step = head, int(tail)
  directory = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoints in {path}", "give a workdir of a run, or WORKDIR/STEP")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  if step is not None:
    if step not in steps:
      raise UserError(f"no checkpoint for step {step} in {directory}",
                      f"saved steps: {', '.join(map(str, steps)) or 'none'}")
    return directory, step
  skipped = []
  for step in reversed(steps):
    if (problem := step_problem(os.path.join(directory, str(step)))) is None:
      if skipped and not quiet:
        warn(f"skipping damaged checkpoint step{'s' * (len(skipped) > 1)} "
             f"{', '.join(str(s) for s, _ in skipped)} ({skipped[0][1]}); using step {step}")
      return directory, step
    skipped.append((step, problem))
  raise UserError(f"no valid checkpoint in {directory}", "train first, or give another workdir")


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` placed by `shardings`: the target of a (resharding) restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  if parts and parts[-1] == "value":  # nnx.Param's own field: params/blocks/0/mlp/down/value
    parts.pop()
  return "/".join(parts)


def _free_name(path: str) -> str:
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}-{n}"
  return candidate


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
