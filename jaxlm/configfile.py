"""Config files (`configs/NAME.py` with `get_config()`) and `--config.key=value` overrides, with
one-line errors for every way they go wrong: a missing file, a syntax error (file:line), a get_config
that raises (its message and line), an unknown key (the closest known one), a value of the wrong type.
"""

import ast
import os
import traceback

import ml_collections

from jaxlm.config import SCHEMA, check_keys, suggest
from jaxlm.errors import UserError

_FIX = "fix the config file; configs/default.py is an example"


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs the file and returns its `get_config()`; every key must be one of the schema's."""
  if not os.path.isfile(path):
    what = "is a folder" if os.path.isdir(path) else "does not exist"
    raise UserError(f"config file {path} {what}", "give --config=configs/NAME.py, e.g. configs/default.py")
  try:
    with open(path, "rb") as f:
      source = f.read()
  except OSError as e:
    raise UserError(f"cannot read config file {path}: {e.strerror}", "check its permissions") from None
  try:
    code = compile(source, path, "exec")
  except SyntaxError as e:  # (ValueError: a NUL byte; both are the file's fault)
    raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}", _FIX) from None
  except ValueError as e:
    raise UserError(f"{path} is not Python source: {e}", _FIX) from None
  namespace = {"__name__": "jaxlm_config", "__file__": os.path.abspath(path)}
  _run_user_code(path, "running it", lambda: exec(code, namespace))  # noqa: S102 (the user's own file)
  get_config = namespace.get("get_config")
  if not callable(get_config):
    raise UserError(f"config file {path} has no get_config() function", _FIX)
  config = _run_user_code(path, "get_config()", get_config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"get_config() in {path} returned a {type(config).__name__}, not a ConfigDict",
                    "start from jaxlm.config.base_config() and return it")
  check_keys(config, source=path)
  return config


def _run_user_code(path: str, what: str, fn):
  """fn(), with any exception raised by the user's config code reported as one line naming its line.

  (Catching every Exception is right here and only here: the code that raised is the user's file.)
  """
  try:
    return fn()
  except Exception as e:  # noqa: BLE001
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename)
              == os.path.abspath(path)]
    where = f"{path}:{frames[-1].lineno}" if frames else path
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"{where}: {what} raised {type(e).__name__}" + (f": {message}" if message else ""),
                    _FIX) from None


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_value(key: str, text: str, current):
  """The text of --config.KEY=TEXT as a value of the key's type."""
  kind = type(current)
  bad = UserError(f"--config.{key}={text}: {key} takes {_KINDS.get(kind, kind.__name__)}",
                  f"e.g. --config.{key}={_example(current)}")
  if kind is bool:
    if text.lower() not in _TRUE + _FALSE:
      raise bad
    return text.lower() in _TRUE
  if kind is int:
    try:
      return int(text)
    except ValueError:
      try:
        number = float(text)  # 1e4: an integer written as a float
      except ValueError:
        raise bad from None
      if not number.is_integer():
        raise bad from None
      return int(number)
  if kind is float:
    try:
      return float(text)
    except ValueError:
      raise bad from None
  if kind in (tuple, list):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise bad from None
    if not isinstance(value, (tuple, list)):
      raise bad
    return tuple(value)
  return text


_KINDS = {bool: "true or false", int: "an integer", float: "a number", tuple: "a Python tuple literal",
          list: "a Python tuple literal", str: "text"}


def _example(value) -> str:
  return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, tuple) else str(value)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with each (key, text) of the command line set."""
  config = config.copy_and_resolve_references()
  known = {key for key, *_ in SCHEMA}
  for key, text in overrides:
    parts = key.split(".")
    holder = config
    for part in parts[:-1]:
      holder = holder.get(part) if isinstance(holder, ml_collections.ConfigDict) else None
    name = parts[-1]
    if not isinstance(holder, ml_collections.ConfigDict) or name not in holder:
      raise UserError(f"unknown config key {key}", f"see `jaxlm train --help` for the keys{suggest(key, known)}")
    if isinstance(holder[name], ml_collections.ConfigDict):
      raise UserError(f"--config.{key} names a section, not a key",
                      f"set one of its keys, e.g. --config.{key}.{next(iter(holder[name].keys()))}=...")
    holder[name] = parse_value(key, text, holder[name])
  return config
