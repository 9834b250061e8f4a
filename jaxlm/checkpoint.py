"""Checkpoints under WORKDIR/checkpoints/<step>/ that never lose work.

Each step holds the TrainState (`state/`, orbax, saved asynchronously) and the data iterator's state
of every process (`data/`). Orbax writes a step into a temporary folder and renames it on commit;
just before the rename, process 0 seals it with `jaxlm-manifest.json`: the size and CRC-32 of every
file (for the step-level metadata that orbax rewrites on commit, only that it exists). A state that
is not finite is never saved; a save that fails for a full disk or a folder it cannot write is one
line (storage_errors.py), and the partial step is set aside at the next start.

Orbax itself does not validate step folders, so restoring checks the newest step first: a step whose
files do not match its manifest (sizes, checksums), or that fails to read or decode, is reported in
one warning naming its step and moved aside to `<step>.damaged` (nothing is deleted, and the step
number is free for training to save again); the next newest valid step is used instead. A transient
storage error is retried; anything else (an out-of-memory, a bug of ours) raises and moves nothing.
Only the keep policy (the newest K, plus the best by validation loss) ever deletes a checkpoint.

Restoring onto abstract arrays that carry the current mesh's shardings reshards, so a run saved on
one mesh or device count continues on another.
"""

import json
import math
import os
import shutil
import threading
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_policy

from jaxlm import files, storage_errors
from jaxlm.errors import RunFailed, UserError, first_line, warn
from jaxlm.manifest import step_problem, write_manifest
from jaxlm.parallel import all_agree

_TMP = ".orbax-checkpoint-tmp"
COMMITTED = "commit_success.txt"  # what marks a step saved in a bucket as committed


RETRIES = 4  # reads of a step that fail transiently (the storage did not answer) are tried this often
RETRY_SECONDS = 2.0  # the first wait between tries; it doubles


class Checkpoints:
  """Saves, validates and restores the train state and data iterator state of one workdir."""

  def __init__(self, workdir: str, keep: int, keep_best: bool = True):
    self.directory = files.join(files.absolute(workdir), "checkpoints")
    self._saving: int | None = None  # the step being saved (the seal callback needs it)
    self._bytes = 0  # its size
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._reported: BaseException | None = None
    policies = [keep_policy.LatestN(n=keep)]
    if keep_best:
      policies.append(keep_policy.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                        keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep_policy.AnyPreservationPolicy(policies),
        best_fn=_val_loss, best_mode="min",  # (makes orbax write the metrics, so a restart knows them)
        enable_async_checkpointing=True, create=True,
        # Synchronous folder creation: a full disk or a read-only folder is an error at once, not a
        # 300 s wait for a signal that the failed creation never sends (measured).
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal,
                                       create_directories_asynchronously=False))
    self._manager = None
    self._set_aside_before_orbax()
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
    thread. Either way a background thread waits for the commit, so a failure shows at `check()`.
    `val_loss` (measured at this step) ranks the step for the keep-best policy. A step that is
    already saved is left as it is (returns False); a state that is not finite is never saved.
    """
    self.wait()
    if step in self._manager.all_steps():
      return False
    if not all_finite(state):
      raise RunFailed(f"the state of step {step} holds non-finite values; it was not saved",
                      "lower --config.optim.lr; the checkpoints saved before are intact")
    data = _Position(data_iterator.get_state())
    metrics = {"step": step} if val_loss is None else {"step": step, "val_loss": float(val_loss)}
    self._saving, self._bytes = step, sum(x.nbytes for x in jax.tree.leaves(state))
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(state)):
      host = jax.tree.map(lambda x: np.array(x, copy=True), state)
      self._in_background(lambda: self._hand_over(step, host, data, metrics))
    else:
      try:
        self._hand_over(step, state, data, metrics)
      except Exception as e:  # noqa: BLE001 - raised (classified) by wait(), as a background failure is
        self._error = e
      self._in_background(lambda: None)
    return True

  def _hand_over(self, step: int, tree, data, metrics) -> None:
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(tree), data=grain.checkpoint.CheckpointSave(data))
    self._manager.save(step, args=args, metrics=metrics)

  def _in_background(self, work) -> None:
    """work(), then the wait for the commit, in a thread; a failure is kept for wait() to raise."""
    def run():
      try:
        if self._error is None:
          work()
          self._manager.wait_until_finished()
      except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by wait()
        self._error = e
    self._thread = threading.Thread(target=run, name=f"jaxlm-save-{self._saving}", daemon=True)
    self._thread.start()

  def _seal(self) -> None:
    """Runs on process 0 after every process has written the step, before orbax commits it."""
    # (In a bucket, orbax writes the step in place and commits it with a commit_success.txt instead.)
    folders = [files.join(self.directory, n) for n in files.listdir(self.directory)
               if n.startswith(f"{self._saving}{_TMP}")]
    folder = max(folders, key=os.path.getmtime) if folders else files.join(self.directory, str(self._saving))
    write_manifest(folder, self._saving)

  def check(self) -> None:
    """Raises now if the last save failed (without waiting for one that is still being written)."""
    if self._thread is not None and not self._thread.is_alive():
      self.wait()

  def wait(self) -> None:
    """Waits until the last save is committed. A failed save raises here: a full disk or a folder that
    cannot be written as a one-line UserError, anything else as it is."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      self._reported = error
      if (user_error := self._save_error(error)) is not None:
        raise user_error from None
      raise error

  def _save_error(self, error: BaseException) -> UserError | None:
    kind, where = storage_errors.kind_of(error), f"{self.directory} while saving checkpoint step {self._saving}"
    if kind == storage_errors.FULL:
      number = next(n for n in map(storage_errors.os_errno, storage_errors.chain(error)) if n)
      free = ("" if files.is_remote(self.directory)
              else f", {shutil.disk_usage(self.directory).free / 1e6:,.1f} MB are free there")
      return UserError(f"{os.strerror(number)} in {where}: a checkpoint needs about {self._bytes / 1e6:,.1f} "
                       f"MB{free}", "free space, or keep fewer checkpoints "
                       "(train.keep_checkpoints), and run the same command again: it resumes from the "
                       "last complete step and sets the partial one aside")
    if kind == storage_errors.PERMISSION:
      return UserError(f"cannot write in {where}: {first_line(error)}",
                       "fix the folder's permissions, or give a --workdir on a writable filesystem")
    return None

  def close(self) -> None:
    """Waits for pending saves to be committed."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except BaseException as e:
        if e is not self._reported:  # (orbax raises a failed save's error once in every thread)
          raise

  def restore_latest(self, abstract_state, data_iterator):
    """The newest valid step restored onto `abstract_state` (and into `data_iterator`), or None.

    Returns (state, step). Damaged steps on the way (files that do not match the manifest, or that
    fail to read or decode) are warned about and moved aside; a transient storage error is retried;
    anything else (an out-of-memory, a bug) raises as it is and moves nothing. A checkpoint whose
    shapes differ from `abstract_state` is not damage either: a UserError names the array.
    """
    for step in reversed(self.steps()):
      problem, kind = step_problem(files.join(self.directory, str(step)), checksums=True), "damaged"
      if problem is None:
        restored, problem, kind = self._restore_checked(step, abstract_state, data_iterator)
      if not all_agree(problem is None):
        problem = problem or "another process could not read it"
      if problem is None:
        return restored, step
      self._set_aside(step, problem, kind)
    return None

  def _restore_checked(self, step: int, abstract_state, data_iterator):
    """(state, None, None), or (None, problem, how to set it aside) for a damaged or non-finite step."""
    for attempt in range(RETRIES):
      try:
        check_shapes(self._manager.item_metadata(step)["state"], abstract_state,
                     f"checkpoint {self.directory}/{step}")
        restored = self._restore(step, abstract_state, data_iterator)
        break
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001 - classified below; what is not known re-raises as it is
        kind = storage_errors.kind_of(e)
        if kind == storage_errors.DAMAGE:
          return None, f"it cannot be read ({first_line(e, typed=True)})", "damaged"
        if kind == storage_errors.PERMISSION:
          raise UserError(f"cannot read checkpoint {self.directory}/{step}: {first_line(e)}",
                          "fix the permissions of the workdir's files") from None
        if kind != storage_errors.TRANSIENT or attempt == RETRIES - 1:
          raise
        delay = RETRY_SECONDS * 2 ** attempt
        warn(f"reading checkpoint step {step} failed ({first_line(e)}); trying again in {delay:g} s")
        time.sleep(delay)
    if int(restored.step) != step:
      return None, f"it holds the state of step {int(restored.step)}", "damaged"
    if not all_finite(restored):
      return None, "it holds non-finite values (saved by a run that diverged)", "nonfinite"
    return restored, None, None

  def _restore(self, step: int, abstract_state, data_iterator):
    folder = files.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    args = {"state": _restore_args(abstract_state)}
    if files.exists(files.join(folder, mine)):
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      saved = len([n for n in files.listdir(folder) if n.startswith("process_") and n.endswith(".json")])
      warn(f"checkpoint step {step} holds the data iterator state of {saved} processes, not "
           f"{jax.process_count()}; the data order continues from the step instead")
    return self._manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def _set_aside(self, step: int, problem: str, kind: str = "damaged") -> None:
    moved = _free_name(files.join(self.directory, f"{step}.{kind}"))
    if jax.process_index() == 0:
      files.rename(files.join(self.directory, str(step)), moved)
    multihost_utils.sync_global_devices(f"jaxlm set aside {step}")
    if self._manager is None:
      warn(f"checkpoint step {step} is damaged: {problem}; moved it to {moved}")
      return
    self._manager.reload()
    earlier = [s for s in self.steps() if s < step]
    then = f"trying step {earlier[-1]}" if earlier else "no earlier checkpoint; starting fresh"
    what = f"is damaged: {problem}" if kind == "damaged" else problem.removeprefix("it ")
    warn(f"checkpoint step {step} {what}; moved it to {moved}; {then}")

  def _set_aside_before_orbax(self) -> None:
    """What would stop orbax from starting, or fool it: temporary folders of saves that never
    committed (the process died while writing), and steps whose metrics file does not decode."""
    names = files.listdir(self.directory)
    leftovers = sorted(n for n in names if _TMP in n) + _uncommitted(self.directory, names)
    multihost_utils.sync_global_devices("jaxlm leftovers listed")
    for name in leftovers:
      step = name.split(".", 1)[0]
      moved = _free_name(files.join(self.directory, f"{step}.incomplete"))
      if jax.process_index() == 0:
        files.rename(files.join(self.directory, name), moved)
      warn(f"checkpoint step {step} was never completed (its save was interrupted); moved its "
           f"temporary folder to {moved}")
    if leftovers:
      multihost_utils.sync_global_devices("jaxlm leftovers moved")
    for step in sorted(int(n) for n in files.listdir(self.directory) if n.isdigit()):
      try:
        json.loads(files.read_bytes(files.join(self.directory, str(step), "metrics", "metrics")))
      except FileNotFoundError:
        pass  # (no metrics: orbax does without)
      except (UnicodeDecodeError, ValueError) as e:
        self._set_aside(step, f"metrics/metrics does not decode ({first_line(e)})")


def _uncommitted(directory: str, names: list[str]) -> list[str]:
  """In a bucket, the step folders of saves that never committed: orbax writes a step in place there and
  marks it done with commit_success.txt (on a disk, it renames a temporary folder instead)."""
  if not files.is_remote(directory):
    return []
  return [n for n in names if n.isdigit() and not files.exists(files.join(directory, n, COMMITTED))]


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


def check_shapes(saved, abstract, where: str, prefix: str = "") -> None:
  """Raises a UserError naming the first array whose saved shape differs from the wanted one."""
  saved_by_path = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  for path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = prefix + path_name(path)
    have = saved_by_path.get(path_name(path))
    if have is None and (scanned := _saved_layout(saved_by_path)) is not None:
      raise UserError(f"{where} holds {'a scanned' if scanned else 'an unrolled'} stack of layers; this run "
                      f"asks for {'an unrolled' if scanned else 'a scanned'} one",
                      f"give --config.model.scan_layers={scanned} to read it")
    if have is None:
      raise UserError(f"{where} has no array {name}",
                      "it was saved by a different model or jaxlm version; start a fresh --workdir")
    if tuple(have.shape) != tuple(want.shape):
      raise UserError(f"{where}: {name} has shape {tuple(have.shape)} there, {tuple(want.shape)} "
                      "here", "use the model settings the checkpoint was trained with")


_STACKS = ("blocks", "encoder", "decoder")


def _saved_layout(saved_by_path: dict) -> bool | None:
  """Whether saved parameters hold scanned stacks (True), unrolled ones (False), or no stack (None)."""
  for name in saved_by_path:
    parts = name.removeprefix("params/").split("/")
    if len(parts) > 1 and parts[0] in _STACKS:
      return not parts[1].isdigit()
  return None


def load_params(path: str, abstract_params):
  """Parameters only, from a workdir (newest valid step), WORKDIR/STEP or WORKDIR/checkpoints/STEP.

  For fine-tuning (`--config.init_from`), evaluation and sampling; returns (params, step).
  `abstract_params` carries the shapes and shardings to load onto; a shape mismatch is a UserError
  naming the parameter. A step that a run training in the workdir deletes (its keep policy) while
  it is being read is replaced by the newest again.
  """
  for attempt in range(3):
    directory, step = resolve_checkpoint(path)
    folder = files.join(directory, str(step))
    try:
      return _read_params(directory, step, abstract_params), step
    except (UserError, ValueError, OSError):
      if files.isdir(folder) or attempt == 2:
        raise
  raise AssertionError("unreachable")


def _read_params(directory: str, step: int, abstract_params):
  folder = files.join(directory, str(step))
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


def resolve_checkpoint(path: str, quiet: bool = False, attempts: int = 5) -> tuple[str, int]:
  """(checkpoints directory, step) for WORKDIR, WORKDIR/STEP or WORKDIR/checkpoints[/STEP].

  Without a step, the newest valid one; newer damaged ones are named in one warning (unless `quiet`).
  A workdir being trained deletes old steps as it saves new ones: a step that vanishes while it is
  checked was rotated away, not damaged, and the steps are listed again.
  """
  path = files.absolute(path.rstrip("/"))
  head, tail = files.split(path)
  step = None
  if tail.isdigit() and not files.isdir(files.join(path, "checkpoints")):
    path, step = head, int(tail)
  directory = path if files.split(path)[1] == "checkpoints" else files.join(path, "checkpoints")
  if not files.isdir(directory):
    raise UserError(f"no checkpoints in {path}", "give a workdir of a run, or WORKDIR/STEP")
  steps = sorted(int(n) for n in files.listdir(directory) if n.isdigit())
  if step is not None:
    if step not in steps:
      raise UserError(f"no checkpoint for step {step} in {directory}",
                      f"saved steps: {', '.join(map(str, steps)) or 'none'}")
    return directory, step
  skipped = []
  for step in reversed(steps):
    if (problem := step_problem(files.join(directory, str(step)))) is None:
      if skipped and not quiet:
        warn(f"skipping damaged checkpoint step{'s' * (len(skipped) > 1)} "
             f"{', '.join(str(s) for s, _ in skipped)} ({skipped[0][1]}); using step {step}")
      return directory, step
    if not files.isdir(files.join(directory, str(step))) and attempts > 1:
      return resolve_checkpoint(path, quiet, attempts - 1)  # (rotated away by the run: list again)
    skipped.append((step, problem))
  raise UserError(f"no valid checkpoint in {directory}", "train first, or give another workdir")


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` placed by `shardings`: the target of a (resharding) restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def path_name(path) -> str:
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
  while files.exists(candidate):
    n += 1
    candidate = f"{path}-{n}"
  return candidate
