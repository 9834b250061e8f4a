"""The one exception type for user mistakes: the CLI prints it as `jaxlm: error: ...` and exits 2."""


class UserError(Exception):
  """A mistake the user can fix (bad config, missing file, ...): what went wrong, and how to fix it."""

  def __init__(self, what: str, hint: str = ""):
    self.what = what
    self.hint = hint
    super().__init__(f"{what} ({hint})" if hint else what)
