"""`jaxlm train --config=configs/NAME.py --workdir=DIR [--config.section.key=value ...]`.

User mistakes end in one line `jaxlm: error: <what> (<how to fix>)` and exit code 2; our own
crashes keep their traceback.
"""

import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from jaxlm.errors import UserError

COMMANDS = ("train",)
USAGE = """usage: jaxlm train --config=configs/NAME.py --workdir=DIR [--config.section.key=value ...]

  train   train a model per the config (resumes if the workdir has a checkpoint)
"""


def _unknown_override(config, argv: list[str]) -> str | None:
  """The first --config.a.b=... whose path is not in the config, or None."""
  for arg in argv:
    match = re.match(r"^--?config\.([\w.]+)", arg)
    if not match:
      continue
    node = config
    for part in match.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        return match.group(1)
      node = node[part]
  return None


def _parse(argv: list[str]):
  values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                                flag_values=values, sys_argv=["jaxlm"] + argv)
  workdir_flag = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go",
                                     flag_values=values)
  extra = values(["jaxlm"] + argv)[1:]
  return config_flag.value, workdir_flag.value, extra


def parse_train_flags(argv: list[str]):
  """argv after `train` -> (config, workdir), or a UserError naming the bad flag."""
  try:
    config, workdir, extra = _parse(argv)
  except flags.Error as e:
    raise UserError(str(e).splitlines()[0], "see `jaxlm --help`") from None
  except (AttributeError, KeyError):  # how ml_collections reports an override of a missing key
    base = _parse([a for a in argv if not re.match(r"^--?config\.", a)])[0]
    raise UserError(f"unknown config key {_unknown_override(base, argv)}",
                    "check the spelling against the config file; keys are section.name") from None
  except OSError as e:
    lines = " ".join(line.strip() for line in str(e).strip().splitlines()[:4])
    raise UserError(f"cannot load config: {lines}",
                    "give --config=configs/NAME.py, a file with get_config()") from None
  if extra:
    raise UserError(f"unexpected arguments: {' '.join(extra)}", "flags look like --name=value")
  if config is None:
    raise UserError("missing --config", "e.g. --config=configs/default.py")
  if not workdir:
    raise UserError("missing --workdir", "e.g. --workdir=/tmp/jaxlm-run")
  return config, workdir


def _set_cpu_devices(count: int) -> None:
  """Splits the host CPU into `count` JAX devices (only the CPU backend is affected).

  A device count already forced through XLA_FLAGS (as the tests do) takes precedence.
  """
  import jax  # imported here: the device count must be set before JAX starts its backends

  if count <= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    raise UserError(f"mesh.cpu_devices={count} cannot be applied: JAX has already started",
                    "set it before any JAX operation, or set --config.mesh.cpu_devices=0") from None


def train(argv: list[str]) -> None:
  config, workdir = parse_train_flags(argv)
  _set_cpu_devices(config.mesh.cpu_devices)
  from jaxlm import loop
  from jaxlm.parallel import initialize_distributed

  initialize_distributed()

  loop.run(config, workdir)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE, end="")
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  try:
    if command not in COMMANDS:
      raise UserError(f"unknown command {command!r}", f"commands: {', '.join(COMMANDS)}")
    train(rest)
  except UserError as e:
    print(f"jaxlm: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxlm: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
