"""`jaxlm --help`, `jaxlm COMMAND --help` (its flags, one line each), the config keys, `--version`."""

import re

import pytest
from conftest import ROOT

import jaxlm
from jaxlm import cli
from jaxlm.config import SCHEMA


def run_cli(capsys, *args):
  code = cli.main(list(args))
  out, err = capsys.readouterr()
  return code, out, err


def test_train_help_lists_its_flags_and_every_config_key_with_its_default(capsys):
  code, out, err = run_cli(capsys, "train", "--help")
  assert code == 0 and err == ""
  for flag in ("--config=FILE", "--workdir=DIR", "--config.KEY=VALUE"):
    assert re.search(rf"^  {re.escape(flag)} +\S", out, re.M), flag
  for key, default, _, description in SCHEMA:
    lines = [line for line in out.splitlines() if line.split()[:1] == [key]]
    assert len(lines) == 1, key
    if not isinstance(default, tuple):
      assert f" {default!r} " in lines[0] and description in lines[0], lines[0]


def test_train_help_with_a_config_shows_that_configs_values(capsys):
  code, out, _ = run_cli(capsys, "train", f"--config={ROOT}/tests/tiny.py", "--config.train.steps=30", "--help")
  assert code == 0
  assert re.search(r"^  train\.steps +30 ", out, re.M) and re.search(r"^  model\.width +64 ", out, re.M)


@pytest.mark.parametrize("command, flags", [
    ("prepare", ("--input=", "--output=", "--tokenizer=byte", "--strict_utf8", "--overwrite")),
    ("sample", ("--workdir=", "--prompt=", "--temperature=0.8", "--top_p=1.0", "--step=")),
    ("eval", ("--workdir=", "--data=", "--step=", "--json")),
])
def test_every_command_prints_its_flags_one_line_each(capsys, command, flags):
  code, out, err = run_cli(capsys, command, "--help")
  assert code == 0 and err == "" and out.startswith(f"usage: jaxlm {command}")
  listed = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
  for flag in flags:
    assert flag in listed, (flag, listed)
  assert all(len(line.split(maxsplit=1)) == 2 for line in out.splitlines() if line.startswith("  --"))


def test_version_and_usage(capsys):
  code, out, _ = run_cli(capsys, "--version")
  assert code == 0 and out.startswith(f"jaxlm {jaxlm.__version__} (jax ")
  code, out, _ = run_cli(capsys, "--help")
  assert code == 0 and "jaxlm COMMAND --help" in out
  code, out, _ = run_cli(capsys)
  assert code == 2 and out.startswith("usage: jaxlm train")
