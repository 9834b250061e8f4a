"""A training run's hold on its workdir: one run at a time, and no empty workdir left by a failed start.

On a disk the lock is an OS lock (`flock`) on WORKDIR/jaxlm.lock, taken by process 0 for the run's
whole life. The kernel drops it when the holder exits in any way, SIGKILL included, so it never goes
stale; the file records who holds it (host, pid, start time, command) for the one line a second run
prints. A bucket (gs://) has no locks, so there the file is a lease (bucket_lock.py).
`jaxlm sample` and `jaxlm eval` only read a workdir and take no lock.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile

import jax

from jaxlm import files
from jaxlm.bucket_lock import Lease
from jaxlm.errors import UserError, warn
from jaxlm.parallel import all_agree

LOCK = "jaxlm.lock"


class Workdir:
  """Context manager around a run: `lock()` before anything is written, released on exit.

  A workdir that did not exist before and still holds nothing but the lock file when the run fails
  is removed again, so a mistake found at start-up leaves nothing behind.
  """

  def __init__(self, path: str):
    self.path = path
    self.existed = all_agree(files.isdir(path))  # (the same answer on every process)
    self.locked = False
    self._file = None

  def __enter__(self) -> "Workdir":
    return self

  def __exit__(self, kind, error, tb) -> None:
    self.release()
    if error is not None and not self.existed and jax.process_index() == 0 and files.isdir(self.path):
      if files.listdir(self.path) in ([], [LOCK]):
        files.remove_tree(self.path)

  def lock(self) -> None:
    """Creates the workdir (checking it is writable) and takes the lock, on process 0; every process
    raises the same UserError if it is held by another run. Taking it again is a no-op."""
    if self.locked:
      return
    problem = None
    if jax.process_index() == 0:
      try:
        _make_writable(self.path)
        if (holder := self._try_lock()) is not None:
          raise UserError(f"workdir {self.path} is in use by {holder}", "wait for that run to end, stop "
                          "it (SIGTERM saves a checkpoint), or give another --workdir")
      except UserError as e:
        problem = e
    if not all_agree(problem is None):
      raise problem or UserError(f"process 0 could not take workdir {self.path}", "see process 0's log")
    self.locked = True

  def _try_lock(self) -> str | None:
    """None once this process holds the lock, else who holds it."""
    if files.is_remote(self.path):
      lease = Lease(files.join(self.path, LOCK), _record())
      if (holder := lease.take()) is None:
        self._file = lease
      return holder
    path = os.path.join(self.path, LOCK)
    f = open(path, "a+")  # noqa: SIM115 (held until release); "a+": the holder's record stays readable
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        warn(f"cannot lock {path} ({e.strerror}): this filesystem has no file locks, so nothing stops a "
             "second run on this workdir")
        self._file = f
        return None
      f.seek(0)
      holder = _describe(f.read())
      f.close()
      return holder
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_record()) + "\n")
    f.flush()
    self._file = f
    return None

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # (closing drops the flock; a lease is given back)
      self._file = None
    self.locked = False


def _record() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def _describe(record: str) -> str:
  try:
    r = json.loads(record)
    return f"pid {r['pid']} on {r['host']} since {r['since']} ({r['command']})"
  except (ValueError, KeyError, TypeError):
    return "another jaxlm run"


def _make_writable(path: str) -> None:
  if files.is_remote(path):
    probe = files.join(path, f".jaxlm-probe-{socket.gethostname()}-{os.getpid()}")
    bucket = path.split("://", 1)[1].split("/", 1)[0]
    try:
      files.write_bytes(probe, b"")
      files.remove(probe)
    except FileNotFoundError:
      raise UserError(f"workdir {path}: there is no bucket {bucket}",
                      f"create it (gcloud storage buckets create gs://{bucket}) or fix the --workdir") from None
    except OSError as e:
      raise UserError(f"workdir {path} is not writable: {e}", "check this machine's credentials (gcloud auth "
                      "application-default login) and its access to the bucket, or give another --workdir") from None
    return
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path):
      pass
  except OSError as e:
    raise UserError(f"workdir {path} is not writable: {e.strerror}",
                    "choose another --workdir or fix its permissions") from None


def saved_config(workdir: str) -> dict | None:
  """The config of the run whose checkpoints are in `workdir`, or None if it has no checkpoints."""
  if not any(n.isdigit() for n in files.listdir(files.join(workdir, "checkpoints"))):
    return None
  try:
    return json.loads(files.read_text(files.join(workdir, "config.json")))
  except (OSError, ValueError):
    return None  # the checkpoints' own shapes are checked when they are restored
