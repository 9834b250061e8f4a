"""`jaxlm train --config=configs/NAME.py --workdir=DIR [--config.section.key=value ...]`.

User mistakes end in one line `jaxlm: error: <what> (<how to fix>)` and exit code 2; our own
crashes keep their traceback.
"""

import json
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from jaxlm.errors import UserError

COMMANDS = ("train", "prepare", "sample", "eval")
USAGE = """usage: jaxlm train --config=configs/NAME.py --workdir=DIR [--config.section.key=value ...]
       jaxlm prepare --input=PATH [--input=PATH ...] --output=DIR [--tokenizer=byte|bpe:VOCAB|FILE]
                     [--text_field=text] [--val_fraction=0.01] [--workers=N] [--strict_utf8] [--overwrite]
       jaxlm sample --workdir=DIR [--prompt=TEXT] [--num_samples=1] [--max_new_tokens=N] [--temperature=0.8]
                    [--top_k=0] [--top_p=1.0] [--seed=0] [--step=STEP]
       jaxlm eval --workdir=DIR [--data=FILE|STORE] [--step=STEP] [--json]

  train     train a model per the config (resumes if the workdir has a checkpoint)
  prepare   tokenize .txt / .jsonl files and folders (optionally .gz) into a token store for
            --config.data.path
  sample    generate text from a trained workdir; it streams as it is decoded
  eval      loss, perplexity and bits per byte of a workdir's model on a text file or store
            (default: the run's validation split)
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


def _define_prepare(values: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("input", [], "text file, folder or .jsonl (repeatable)", flag_values=values)
  flags.DEFINE_string("output", None, "store folder or gs:// URL", flag_values=values)
  flags.DEFINE_string("tokenizer", "byte", "byte, bpe:VOCAB or a tokenizer.json", flag_values=values)
  flags.DEFINE_string("text_field", "text", "the JSONL field that holds the text", flag_values=values)
  flags.DEFINE_float("val_fraction", 0.01, "share of documents for validation", flag_values=values)
  flags.DEFINE_integer("workers", 1, "tokenizer processes", flag_values=values)
  flags.DEFINE_integer("seed", 0, "seed of the train/validation split", flag_values=values)
  flags.DEFINE_bool("strict_utf8", False, "invalid UTF-8 is an error (default: replaced)",
                    flag_values=values)
  flags.DEFINE_bool("overwrite", False, "replace an existing store", flag_values=values)


def parse_prepare_flags(argv: list[str]) -> dict:
  values = _parse_flags(argv, _define_prepare)
  if not values.input:
    raise UserError("missing --input", "e.g. --input=corpus/ or --input=data.jsonl.gz")
  if not values.output:
    raise UserError("missing --output", "e.g. --output=data/mystore")
  return {name: values[name].value for name in ("input", "output", "tokenizer", "text_field",
                                                "val_fraction", "workers", "seed", "strict_utf8",
                                                "overwrite")}


def prepare(argv: list[str]) -> None:
  args = parse_prepare_flags(argv)
  from jaxlm.data.prepare import prepare as run_prepare

  inputs, output = args.pop("input"), args.pop("output")
  meta = run_prepare(inputs, output, **args)
  train, val = meta["splits"]["train"], meta["splits"]["validation"]
  replaced = meta["sources"]["invalid_utf8_replaced"]
  print(f"{output}: {meta['sources']['files']} files, {train['documents'] + val['documents']:,} documents, "
        f"{train['tokens']:,} training / {val['tokens']:,} validation tokens ({meta['tokenizer']['type']}, "
        f"vocabulary {meta['tokenizer']['vocab_size']:,}; split by {meta['split_by']}) in "
        f"{meta['seconds']:.1f} s" + (f"; {replaced:,} invalid UTF-8 sequences replaced" if replaced else ""))


def _parse_flags(argv: list[str], define) -> flags.FlagValues:
  values = flags.FlagValues()
  define(values)
  try:
    extra = values(["jaxlm"] + argv)[1:]
  except flags.Error as e:
    raise UserError(str(e).splitlines()[0], "see `jaxlm --help`") from None
  if extra:
    raise UserError(f"unexpected arguments: {' '.join(extra)}", "flags look like --name=value")
  return values


def _parse_run_flags(argv: list[str], define) -> flags.FlagValues:
  values = _parse_flags(argv, define)
  if not values.workdir:
    raise UserError("missing --workdir", "give the --workdir of a training run")
  return values


def _define_sample(v: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "the run's workdir", flag_values=v)
  flags.DEFINE_string("prompt", None, "text to continue (default: the run's train.sample_prompt)", flag_values=v)
  flags.DEFINE_integer("num_samples", 1, "how many continuations", flag_values=v)
  flags.DEFINE_integer("max_new_tokens", 0, "tokens to generate (0: as many as fit)", flag_values=v)
  flags.DEFINE_float("temperature", 0.8, "0: greedy", flag_values=v)
  flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0: all)", flag_values=v)
  flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of probability p (1: all)", flag_values=v)
  flags.DEFINE_integer("seed", 0, "random seed", flag_values=v)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=v)


def _define_eval(v: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "the run's workdir", flag_values=v)
  flags.DEFINE_string("data", None, "a text file or prepared store (default: the run's validation split)",
                      flag_values=v)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=v)
  flags.DEFINE_bool("json", False, "print one JSON object", flag_values=v)


def _start_jax_for(workdir: str) -> None:
  """Before JAX starts: the run's CPU device split, and the distributed runtime if asked for."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      _set_cpu_devices(int(json.load(f)["mesh"]["cpu_devices"]))
  except (OSError, ValueError, KeyError, TypeError):
    pass  # loading the run reports what is wrong with it
  from jaxlm.parallel import initialize_distributed

  initialize_distributed()


def sample(argv: list[str]) -> None:
  v = _parse_run_flags(argv, _define_sample)
  from jaxlm.generate import Sampling

  Sampling(v.temperature, v.top_k, v.top_p).check()
  if v.num_samples < 1:
    raise UserError(f"--num_samples must be at least 1, got {v.num_samples}", "e.g. --num_samples=3")
  if v.max_new_tokens < 0:
    raise UserError(f"--max_new_tokens must be positive, got {v.max_new_tokens}", "0 means as many as fit")
  _start_jax_for(v.workdir)
  import jax

  from jaxlm.api import load

  run = load(v.workdir, v.step)
  prompt = run.config.train.sample_prompt if v.prompt is None else v.prompt
  run.check_prompt(prompt, v.max_new_tokens or None)  # (before anything is printed)
  chief = jax.process_index() == 0

  def show(i: int, text: str) -> None:
    if chief:
      sys.stdout.write(text)
      sys.stdout.flush()

  for i in range(v.num_samples):
    if chief:
      if v.num_samples > 1:
        print(f"{'' if i == 0 else chr(10)}--- sample {i + 1} of {v.num_samples} ---")
      sys.stdout.write(prompt)
      sys.stdout.flush()
    run.generate(prompt, max_new_tokens=v.max_new_tokens or None, temperature=v.temperature, top_k=v.top_k,
                 top_p=v.top_p, seed=v.seed, num_samples=1, on_text=show, sample_id=i)
    if chief:
      print()


def evaluate(argv: list[str]) -> None:
  v = _parse_run_flags(argv, _define_eval)
  _start_jax_for(v.workdir)
  import jax

  from jaxlm.api import load

  result = load(v.workdir, v.step).evaluate(v.data)
  if jax.process_index() != 0:
    return
  if v.json:
    print(json.dumps(result))
  else:
    print(f"{result['data']} at step {result['step']}: loss {result['loss']:.4f}, perplexity "
          f"{result['perplexity']:.3f}, bits per byte {result['bits_per_byte']:.4f} ({result['tokens']:,} tokens)")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE, end="")
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  try:
    if command not in COMMANDS:
      raise UserError(f"unknown command {command!r}", f"commands: {', '.join(COMMANDS)}")
    {"train": train, "prepare": prepare, "sample": sample, "eval": evaluate}[command](rest)
  except UserError as e:
    print(f"jaxlm: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxlm: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
