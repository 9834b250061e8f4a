"""The exceptions the CLI prints as one line `jaxlm: error: ...` (no traceback), and their exit codes.

Anything else that escapes is a bug of ours and keeps its traceback.
"""

import re
import sys


class UserError(Exception):
  """A mistake the user can fix (bad config, missing file, ...): what went wrong, and how to fix it."""

  exit_code = 2

  def __init__(self, what: str, hint: str = ""):
    self.what = what
    self.hint = hint
    super().__init__(f"{what} ({hint})" if hint else what)


class RunFailed(UserError):
  """A run that cannot go on (its loss diverged, it lost a process); what was saved before is intact."""

  exit_code = 3


def warn(text: str) -> None:
  """`jaxlm: warning: TEXT` on stderr, from process 0 only (JAX must have started)."""
  import jax

  if jax.process_index() == 0:
    print(f"jaxlm: warning: {text}", file=sys.stderr, flush=True)


def first_line(e: BaseException, typed: bool = False) -> str:
  """The first line of the innermost error of `e`'s chain of causes (`raise ... from`: orbax wraps the
  useful one), without tensorstore's payloads ([tensorstore_spec='...']); `typed`: its type in front."""
  while e.__cause__ is not None and e.__cause__ is not e:
    e = e.__cause__
  lines = re.sub(r" ?\[[a-z_]+='[^']*'\]", "", str(e).strip()).splitlines()
  text = lines[0][:200] if lines else ""
  return f"{type(e).__name__}: {text}" if typed and text else text or type(e).__name__
