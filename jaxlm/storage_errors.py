"""What a storage exception from orbax or tensorstore means: damage, transient, full, no permission.

Orbax wraps read errors in a bare `Exception(...) from e`, and tensorstore raises every status as a
`ValueError` whose message starts with the absl code (`DATA_LOSS: ...`) and carries the OS errno as a
payload (`[os_error_code='28']`); Python's own file errors are `OSError`s. So the chain of causes is
walked, innermost first, and the first error that says what it is decides. Anything not recognised is
`None`: the caller re-raises it with its traceback (an out-of-memory or a bug of ours is never damage).
"""

import contextlib
import errno
import json
import re

from jaxlm.errors import UserError

DAMAGE, TRANSIENT, FULL, PERMISSION = "damage", "transient", "full", "permission"

_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_CODE = re.compile(r"^([A-Z_]{4,}): ")
_BY_ERRNO = {
    errno.ENOSPC: FULL, errno.EDQUOT: FULL,
    errno.EACCES: PERMISSION, errno.EPERM: PERMISSION, errno.EROFS: PERMISSION,
    errno.EAGAIN: TRANSIENT, errno.EINTR: TRANSIENT, errno.ETIMEDOUT: TRANSIENT, errno.ESTALE: TRANSIENT,
    errno.EIO: TRANSIENT, errno.ECONNRESET: TRANSIENT, errno.EBUSY: TRANSIENT,
}
# tensorstore's codes for reading a file whose bytes are not what was written (a checksum, a decode, a
# range past its end) and for a service that did not answer this time.
_BY_CODE = {
    "DATA_LOSS": DAMAGE, "OUT_OF_RANGE": DAMAGE, "FAILED_PRECONDITION": DAMAGE, "NOT_FOUND": DAMAGE,
    "PERMISSION_DENIED": PERMISSION,
    "UNAVAILABLE": TRANSIENT, "DEADLINE_EXCEEDED": TRANSIENT, "ABORTED": TRANSIENT,
}


def chain(e: BaseException) -> list[BaseException]:
  """e and its causes, innermost first."""
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out[::-1]


def os_errno(e: BaseException) -> int | None:
  """The OS error number an exception carries, as an attribute or as tensorstore's payload."""
  if isinstance(e, OSError) and e.errno:
    return e.errno
  match = _ERRNO.search(str(e))
  return int(match.group(1)) if match else None


def kind_of(e: BaseException) -> str | None:
  """DAMAGE, TRANSIENT, FULL, PERMISSION, or None (not a storage error we know: re-raise it)."""
  for error in chain(e):
    if isinstance(error, MemoryError):
      return None  # (RESOURCE_EXHAUSTED without an errno is memory too, and unknown below)
    if isinstance(error, TimeoutError):
      return TRANSIENT
    if (number := os_errno(error)) in _BY_ERRNO:
      return _BY_ERRNO[number]
    if isinstance(error, ValueError) and (match := _CODE.match(str(error))) and match.group(1) in _BY_CODE:
      return _BY_CODE[match.group(1)]
    if isinstance(error, (UnicodeDecodeError, json.JSONDecodeError, FileNotFoundError)):
      return DAMAGE  # a metadata or iterator-state file that does not decode, or is gone
  return None


@contextlib.contextmanager
def writing(what: str, where: str, again: str = "run the same command again: it resumes from the last checkpoint",
            elsewhere: str = "give a --workdir on a writable filesystem"):
  """Around a write of our own files (a run's metrics.jsonl, TensorBoard, loss.png; an export): a full disk
  or a folder that cannot be written is one line (`again`, `elsewhere`: the hints); any other error raises
  as it is."""
  try:
    yield
  except OSError as e:
    kind = kind_of(e)
    if kind == FULL:
      raise UserError(f"{e.strerror or e} in {where} while writing {what}", f"free space and {again}") from None
    if kind == PERMISSION:
      raise UserError(f"cannot write {what} in {where}: {e.strerror or e}",
                      f"fix the folder's permissions, or {elsewhere}") from None
    raise
