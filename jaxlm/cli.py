"""`jaxlm train --config=configs/NAME.py --workdir=DIR [--config.section.key=value ...]`.

User mistakes end in one line `jaxlm: error: <what> (<how to fix>)` and exit code 2; our own
crashes keep their traceback.
"""

import dataclasses
import json
import os
import re
import sys

from absl import flags

from jaxlm import allocator
from jaxlm.errors import UserError

COMMANDS = ("train", "prepare", "sample", "eval", "plan", "plot", "import", "export")
USAGE = """usage: jaxlm train --config=configs/NAME.py --workdir=DIR [--config.section.key=value ...]
       jaxlm prepare --input=PATH [--input=PATH ...] --output=DIR [--tokenizer=byte|bpe:VOCAB|FILE] [...]
       jaxlm sample --workdir=DIR [--prompt=TEXT] [--num_samples=1] [--temperature=0.8] [...]
       jaxlm eval --workdir=DIR [--data=FILE|STORE] [--step=STEP] [--json]
       jaxlm plan --config=FILE [--config.KEY=VALUE ...] [--devices=N | --topology=NAME] [--mfu=0.4] [--json]
       jaxlm plot --workdir=DIR [--workdir=DIR ...] --output=FILE.png [--x=tokens|step]
       jaxlm import --from=HF_DIR --workdir=DIR [--scan_layers]
       jaxlm export --workdir=DIR --to=HF_DIR [--step=STEP] [--dtype=float32|bfloat16]
       jaxlm COMMAND --help    (its flags; `jaxlm train --config=FILE --help`: that config's keys)
       jaxlm --version

  train     train a model per the config (resumes if the workdir has a checkpoint)
  prepare   tokenize .txt / .jsonl files and folders (optionally .gz) into a token store for
            --config.data.path
  sample    generate text from a trained workdir (it streams as it is decoded); for a masked-LM
            run, fill the <mask>s of --prompt; for an encoder-decoder, print its target (--beams=N)
  eval      loss, perplexity and bits per byte (and accuracy, and a seq2seq run's exact match) of a
            workdir's model over a text file or store (default: the run's validation split)
  plan      without training: parameters, FLOPs, tokens and the Chinchilla budget, memory per device
            of the train step compiled ahead of time for the mesh (whether it fits), and the time
  plot      the loss curves of runs overlaid in one PNG (each run also keeps WORKDIR/loss.png)
  import    a local Hugging Face GPT-2 or Llama folder (config.json, *.safetensors, tokenizer.json)
            as a workdir to sample, evaluate and fine-tune (--config.init_from=DIR)
  export    a decoder run as a Hugging Face folder that transformers' from_pretrained loads
"""

_TRAIN_FLAGS = """usage: jaxlm train --config=configs/NAME.py --workdir=DIR [--config.section.key=value ...]

flags:
  --config=FILE              experiment config file with get_config() (e.g. configs/default.py)
  --workdir=DIR              where config.json, metrics.jsonl, tensorboard/ and checkpoints go; a rerun resumes
  --config.KEY=VALUE         override one config key (e.g. --config.optim.lr=3e-4)
  --help                     this text (with --config: that file's values)
"""


@dataclasses.dataclass
class TrainArgs:
  config: str | None = None
  workdir: str | None = None
  overrides: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  help: bool = False


def parse_train_flags(argv: list[str]) -> TrainArgs:
  """argv after `train` -> TrainArgs, or a UserError naming the bad flag."""
  args, rest = TrainArgs(), list(argv)
  while rest:
    arg = rest.pop(0)
    if arg in ("-h", "--help", "-help"):
      args.help = True
    elif match := re.fullmatch(r"--?(config|workdir)(?:=(.*))?", arg, re.S):
      name, value = match.groups()
      if value is None:
        if not rest or rest[0].startswith("-"):
          raise UserError(f"--{name} needs a value", f"e.g. --{name}={_EXAMPLES[name]}")
        value = rest.pop(0)
      setattr(args, name, value)
    elif match := re.fullmatch(r"--?config\.([^=]+)=(.*)", arg, re.S):
      args.overrides.append(match.groups())
    elif re.match(r"--?config\.", arg):
      raise UserError(f"{arg} has no value", "overrides look like --config.optim.lr=3e-4")
    elif arg.startswith("-"):
      raise UserError(f"unknown flag {arg.split('=', 1)[0]}",
                      "train takes --config, --workdir and --config.KEY=VALUE; see `jaxlm train --help`")
    else:
      raise UserError(f"unexpected argument {arg!r}", "flags look like --name=value")
  return args


_EXAMPLES = {"config": "configs/default.py", "workdir": "runs/mine"}


def train_config(args: TrainArgs):
  """The config file of `args` with its overrides applied (the base config when there is no file)."""
  from jaxlm.config import base_config
  from jaxlm.configfile import apply_overrides, load_config_file

  return apply_overrides(load_config_file(args.config) if args.config else base_config(), args.overrides)


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
  args = parse_train_flags(argv)
  if args.help:
    from jaxlm.config import describe

    print(_TRAIN_FLAGS + f"\nconfig keys ({args.config or 'defaults'}: key, value, description):\n"
          + describe(train_config(args)))
    return
  if args.config is None:
    raise UserError("missing --config", "e.g. --config=configs/default.py")
  if not args.workdir:
    raise UserError("missing --workdir", "e.g. --workdir=runs/mine")
  config = train_config(args)
  _set_cpu_devices(config.mesh.cpu_devices)
  from jaxlm import loop
  from jaxlm.parallel import initialize_distributed

  initialize_distributed()

  loop.run(config, args.workdir)


def _define_prepare(values: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("input", [], "text file, folder or .jsonl (repeatable)", flag_values=values)
  flags.DEFINE_string("output", None, "store folder or gs:// URL", flag_values=values)
  flags.DEFINE_string("tokenizer", "byte", "byte, bpe:VOCAB or a tokenizer.json", flag_values=values)
  flags.DEFINE_string("text_field", "text", "the JSONL field that holds the text", flag_values=values)
  flags.DEFINE_string("pairs", None, "fine-tuning examples: JSONL fields PROMPT,RESPONSE, loss on the response "
                      "(bare: prompt,response)", flag_values=values)
  flags.DEFINE_float("val_fraction", 0.01, "share of documents for validation", flag_values=values)
  flags.DEFINE_integer("workers", 1, "tokenizer processes", flag_values=values)
  flags.DEFINE_integer("seed", 0, "seed of the train/validation split", flag_values=values)
  flags.DEFINE_bool("strict_utf8", False, "invalid UTF-8 is an error (default: replaced)",
                    flag_values=values)
  flags.DEFINE_bool("overwrite", False, "replace an existing store", flag_values=values)


def _bare_pairs_to_default(argv: list[str]) -> list[str]:
  """A bare --pairs (last, or before another flag) becomes --pairs=prompt,response: absl string flags need
  a value."""
  return [f"{arg}=prompt,response" if arg in ("--pairs", "-pairs") and after.startswith("-") else arg
          for arg, after in zip(argv, argv[1:] + ["-"])]


def parse_prepare_flags(argv: list[str]) -> dict:
  values = _parse_flags(_bare_pairs_to_default(argv), _define_prepare)
  if not values.input:
    raise UserError("missing --input", "e.g. --input=corpus/ or --input=data.jsonl.gz")
  if not values.output:
    raise UserError("missing --output", "e.g. --output=data/mystore")
  args = {name: values[name].value for name in ("input", "output", "tokenizer", "text_field", "val_fraction",
                                                "workers", "seed", "strict_utf8", "overwrite")}
  return {**args, "pairs": None if values.pairs is None else tuple(values.pairs.split(","))}


def prepare(argv: list[str]) -> None:
  args = parse_prepare_flags(argv)
  from jaxlm.data.prepare import prepare as run_prepare

  inputs, output = args.pop("input"), args.pop("output")
  meta = run_prepare(inputs, output, **args)
  train, val = meta["splits"]["train"], meta["splits"]["validation"]
  replaced = meta["sources"]["invalid_utf8_replaced"]
  pairs = (f"; pairs {','.join(meta['pairs'])}: loss on {train['weighted_tokens']:,} of {train['tokens']:,} "
           "training tokens") if "pairs" in meta else ""
  print(f"{output}: {meta['sources']['files']} files, {train['documents'] + val['documents']:,} documents, "
        f"{train['tokens']:,} training / {val['tokens']:,} validation tokens ({meta['tokenizer']['type']}, "
        f"vocabulary {meta['tokenizer']['vocab_size']:,}; split by {meta['split_by']}) in "
        f"{meta['seconds']:.1f} s" + pairs
        + (f"; {replaced:,} invalid UTF-8 sequences replaced" if replaced else ""))


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
  flags.DEFINE_string("prompt", None, "text to continue (default: the run's train.sample_prompt); for a "
                      "masked-LM run, text with <mask> where tokens are missing", flag_values=v)
  flags.DEFINE_integer("num_samples", 1, "how many continuations", flag_values=v)
  flags.DEFINE_integer("max_new_tokens", 0, "tokens to generate (0: as many as fit the positions; more slide the context)", flag_values=v)
  flags.DEFINE_float("temperature", 0.8, "0: greedy (encoder-decoder runs: greedy unless given)", flag_values=v)
  flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0: all); masked LM: also "
                       "print the k most likely tokens of each mask", flag_values=v)
  flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of probability p (1: all)", flag_values=v)
  flags.DEFINE_integer("seed", 0, "random seed", flag_values=v)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=v)
  flags.DEFINE_integer("beams", 1, "encoder-decoder: beam search with this many beams (1: none)", flag_values=v)
  flags.DEFINE_float("alpha", 0.6, "encoder-decoder: beam search's length penalty (t5x's alpha)", flag_values=v)


def _define_eval(v: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "the run's workdir", flag_values=v)
  flags.DEFINE_string("data", None, "a text file or prepared store (default: the run's validation split)",
                      flag_values=v)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=v)
  flags.DEFINE_bool("json", False, "print one JSON object", flag_values=v)
  flags.DEFINE_integer("max_examples", 100, "seq2seq: validation pairs decoded for exact match (0: all)",
                       flag_values=v)


def _start_jax_for(workdir: str) -> None:
  """Before JAX starts: the run's CPU device split, and the distributed runtime if asked for."""
  try:
    from jaxlm import files

    _set_cpu_devices(int(json.loads(files.read_text(files.join(workdir, "config.json")))["mesh"]["cpu_devices"]))
  except (OSError, ValueError, KeyError, TypeError):
    pass  # loading the run reports what is wrong with it
  from jaxlm.parallel import initialize_distributed

  initialize_distributed()


def sample(argv: list[str]) -> None:
  v = _parse_run_flags(argv, _define_sample)
  from jaxlm.config import check_utf8
  from jaxlm.generate import Sampling

  if v.prompt is not None:
    check_utf8("--prompt", v.prompt)
  Sampling(v.temperature, v.top_k, v.top_p).check()
  if v.num_samples < 1:
    raise UserError(f"--num_samples must be at least 1, got {v.num_samples}", "e.g. --num_samples=3")
  if v.max_new_tokens < 0:
    raise UserError(f"--max_new_tokens must be positive, got {v.max_new_tokens}", "0 means as many as fit")
  _start_jax_for(v.workdir)
  from jaxlm.api import load

  run = load(v.workdir, v.step)
  prompt = run.config.train.sample_prompt if v.prompt is None else v.prompt
  kind = run.objective.prompt_kind
  if kind != "translate":
    _refuse(run, v, ("beams", "alpha"), "they apply to encoder-decoder runs", "drop them")
  {"fill": _fill, "continue": _continue, "translate": _translate}[kind](run, v, prompt)


_FILL_FLAGS = ("num_samples", "max_new_tokens", "temperature", "top_p", "seed")  # (decoding only)


def _refuse(run, v: flags.FlagValues, names, why: str, fix: str) -> None:
  """One error line for flags given that do not apply to this run."""
  given = [f"--{name}" for name in names if v[name].present]
  if given:
    raise UserError(f"{', '.join(given)} do{'es' * (len(given) == 1)} not apply to {run.workdir} (objective "
                    f"{run.objective.name}): {why}", fix)


def _translate(run, v: flags.FlagValues, prompt: str) -> None:
  """`jaxlm sample` of an encoder-decoder run: the decoded target of the prompt (greedy by default)."""
  import jax

  if v.beams > 1:
    _refuse(run, v, ("temperature", "top_k", "top_p", "num_samples"), f"beam search (--beams={v.beams}) is "
            "deterministic and gives one target", "drop them, or sample with --beams=1")
  temperature = v.temperature if v["temperature"].present else 0.0
  for i in range(v.num_samples):
    target = run.translate(prompt, max_new_tokens=v.max_new_tokens or None, temperature=temperature,
                           top_k=v.top_k, top_p=v.top_p, seed=v.seed, beams=v.beams, alpha=v.alpha, sample_id=i)
    if jax.process_index() == 0:
      if v.num_samples > 1:
        print(f"--- sample {i + 1} of {v.num_samples} ---")
      print(target, flush=True)


def _fill(run, v: flags.FlagValues, prompt: str) -> None:
  """`jaxlm sample` of a masked-LM run: the prompt with its masks filled, and each mask's top-k."""
  import jax

  _refuse(run, v, _FILL_FLAGS, "a masked-LM run fills masks in one pass, it does not decode",
          "drop them; --prompt, --top_k and --step apply")
  filled = run.fill(prompt, top_k=v.top_k)
  if jax.process_index() == 0:
    print(filled.text)
    for n, candidates in enumerate(filled.candidates, 1):
      shown = "  ".join(f"{text!r} {p:.3f}" for text, p in candidates)
      print(f"  <mask> {n}: {shown}")


def _continue(run, v: flags.FlagValues, prompt: str) -> None:
  """`jaxlm sample` of a decoder run: continuations streamed as they are decoded."""
  import jax

  from jaxlm.generate import positions_full

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
      print(flush=True)
      if run.filled_positions:
        print(f"jaxlm: note: {positions_full(run.model_config.max_seq_len)}", file=sys.stderr, flush=True)


_ROWS = {"windows": "windows", "packed": "packed documents"}  # (data.sequences, in words)


def evaluate(argv: list[str]) -> None:
  v = _parse_run_flags(argv, _define_eval)
  _start_jax_for(v.workdir)
  import jax

  from jaxlm.api import load

  run = load(v.workdir, v.step)
  result = run.evaluate(v.data, max_examples=v.max_examples)
  if jax.process_index() != 0:
    return
  if v.json:
    print(json.dumps(result))
  else:
    accuracy = f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
    if "exact_match" in result:
      accuracy += f", exact match {result['exact_match']:.4f} of {result['examples']:,} pairs (greedy)"
    print(f"{result['data']} at step {result['step']}, {result['counted']} ({result['tokens']:,}): loss "
          f"{result['loss']:.4f}, perplexity {result['perplexity']:.3f}, bits per byte "
          f"{result['bits_per_byte']:.4f}{accuracy} (training's val_loss is an estimate of this from "
          f"{run.config.train.eval_batches} batches of {_ROWS[run.config.data.sequences]})")


def _define_plan(v: flags.FlagValues) -> None:
  flags.DEFINE_string("config", None, "experiment config file with get_config(); --config.KEY=VALUE "
                      "overrides its keys, as for train", flag_values=v)
  flags.DEFINE_string("devices", None, "plan for N simulated CPU devices (default: this process's devices)",
                      flag_values=v)
  flags.DEFINE_string("topology", None, "plan for a TPU slice, e.g. v5e:2x2 or v5p:4x4x4 (needs libtpu)",
                      flag_values=v)
  flags.DEFINE_float("mfu", 0.4, "model FLOPs utilization the time estimate assumes, in (0, 1]", flag_values=v)
  flags.DEFINE_float("memory_per_device", None, "GiB per device to fit in (default: the device's, or the "
                     "host's shared by CPU devices)", flag_values=v)
  flags.DEFINE_bool("json", False, "print one JSON object", flag_values=v)


def parse_plan_flags(argv: list[str]) -> tuple[TrainArgs, flags.FlagValues]:
  """argv after `plan` -> (the config file and its overrides, the plan's own flags), checked."""
  overrides = [a for a in argv if re.match(r"--?config\.", a)]
  v = _parse_flags([a for a in argv if a not in overrides], _define_plan)
  args = parse_train_flags(overrides)
  args.config = v.config
  if args.config is None:
    raise UserError("missing --config", "e.g. --config=configs/default.py")
  if v.devices is not None and v.topology is not None:
    raise UserError("--devices and --topology both given", "plan for simulated CPU devices or a TPU topology, "
                    "not both")
  if v.devices is not None and not (re.fullmatch(r"[0-9]+", v.devices) and int(v.devices) > 0):
    raise UserError(f"--devices must be a positive integer, got {v.devices!r}", "e.g. --devices=8")
  if not 0 < v.mfu <= 1:
    raise UserError(f"--mfu must be in (0, 1], got {v.mfu:g}", "e.g. --mfu=0.4 (40% of the peak)")
  if v.memory_per_device is not None and not v.memory_per_device > 0:
    raise UserError(f"--memory_per_device must be positive (GiB), got {v.memory_per_device:g}",
                    "e.g. --memory_per_device=16")
  return args, v


def plan(argv: list[str]) -> None:
  args, v = parse_plan_flags(argv)
  config = train_config(args)
  devices = None if v.devices is None else int(v.devices)
  if devices is None and v.topology is None:
    _set_cpu_devices(config.mesh.cpu_devices)  # (this process's devices, as `jaxlm train` would have them)
  from jaxlm import plan as planning

  report = planning.plan(config, devices=devices, topology=v.topology, mfu=v.mfu,
                         memory_per_device_gib=v.memory_per_device)
  print(json.dumps(report) if v.json else planning.describe(report, args.config), flush=True)
  planning.check_fits(report, config)


def _define_plot(v: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("workdir", [], "a run's workdir (repeat the flag for each run)", flag_values=v)
  flags.DEFINE_string("output", None, "the PNG to write (e.g. cmp.png)", flag_values=v)
  flags.DEFINE_enum("x", "tokens", ["tokens", "step"], "the horizontal axis", flag_values=v)


def plot(argv: list[str]) -> None:
  """`jaxlm plot`: the loss curves of one or more runs overlaid in one PNG."""
  v = _parse_flags(argv, _define_plot)
  if not v.workdir:
    raise UserError("missing --workdir", "give one --workdir per run, e.g. --workdir=runs/a --workdir=runs/b")
  if not v.output:
    raise UserError("missing --output", "e.g. --output=cmp.png")
  if not v.output.lower().endswith(".png"):
    raise UserError(f"--output {v.output} does not end in .png", "e.g. --output=cmp.png (a PNG is written)")
  from jaxlm import files, plots
  from jaxlm.api import _saved_config
  from jaxlm.metrics import parse_rows

  folder = files.split(files.absolute(v.output))[0]
  if not files.isdir(folder):
    raise UserError(f"the folder of --output, {folder}, does not exist", "create it, or write elsewhere")
  runs, names = [], [files.split(w.rstrip("/"))[1] for w in v.workdir]
  for workdir in v.workdir:
    config = _saved_config(workdir)
    path = files.join(workdir, "metrics.jsonl")
    rows = parse_rows(files.read_text(path)) if files.isfile(path) else []
    if not any("loss" in m for m in rows):
      raise UserError(f"{workdir} has no training losses in metrics.jsonl yet", "plot a run that has logged a step")
    name = files.split(workdir.rstrip("/"))[1]
    runs.append((workdir if names.count(name) > 1 else name, rows,
                 config.data.batch_size * config.data.seq_len))
  plots.write_png(plots.compare_figure(runs, v.x), v.output)
  print(f"{v.output}: {len(runs)} runs, loss against {v.x}")


def _define_import(v: flags.FlagValues) -> None:
  flags.DEFINE_string("from", None, "a local Hugging Face model folder (config.json, *.safetensors, "
                      "tokenizer.json)", flag_values=v)
  flags.DEFINE_string("workdir", None, "the new workdir to write", flag_values=v)
  flags.DEFINE_bool("scan_layers", False, "store the blocks as a scanned stack (for runs with "
                    "model.scan_layers=True)", flag_values=v)


def import_hf(argv: list[str]) -> None:
  """`jaxlm import`: a Hugging Face GPT-2 or Llama folder as a jaxlm workdir."""
  v = _parse_flags(argv, _define_import)
  if not v["from"].value:
    raise UserError("missing --from", "give the folder of a Hugging Face model, e.g. --from=models/gpt2")
  if not v.workdir:
    raise UserError("missing --workdir", "give the new workdir to write, e.g. --workdir=runs/gpt2")
  _start_jax_for(v.workdir)
  from jaxlm.interop.hf_import import import_folder

  done = import_folder(v["from"].value, v.workdir, scan_layers=v.scan_layers)
  m = done["config"].model
  print(f"{v.workdir}: {done['family']} of {done['parameters']:,} parameters ({m.num_layers} layers, width "
        f"{m.width}, {m.num_heads} heads, {m.max_seq_len} positions) from {v['from'].value} "
        f"({', '.join(done['dtypes'])}) in {done['seconds']:.1f} s; fine-tune it with "
        f"--config.init_from={v.workdir}")


def _define_export(v: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "the run's workdir", flag_values=v)
  flags.DEFINE_string("to", None, "the new folder to write", flag_values=v)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=v)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the written weights", flag_values=v)


def export_hf(argv: list[str]) -> None:
  """`jaxlm export`: a decoder run as a Hugging Face folder."""
  v = _parse_run_flags(argv, _define_export)
  if not v.to:
    raise UserError("missing --to", "give the new folder to write, e.g. --to=exported/gpt2")
  _start_jax_for(v.workdir)
  from jaxlm.api import load
  from jaxlm.interop.hf_export import export_run

  done = export_run(load(v.workdir, v.step), v.to, v.dtype)
  print(f"{v.to}: {done['family']} from {v.workdir} step {done['step']} ({done['tensors']} tensors, "
        f"{done['bytes'] / 2**20:,.1f} MiB of {done['dtype']}) in {done['seconds']:.1f} s; "
        f"transformers.AutoModelForCausalLM.from_pretrained({v.to!r}) loads it")


_DEFINES = {"prepare": _define_prepare, "sample": _define_sample, "eval": _define_eval, "plan": _define_plan,
            "plot": _define_plot, "import": _define_import, "export": _define_export}


def flags_help(command: str) -> str:
  """`jaxlm COMMAND --help`: every flag of the command with its default and one line of help."""
  values = flags.FlagValues()
  _DEFINES[command](values)
  lines = [f"usage: jaxlm {command} [--flag=value ...]", "", "flags:"]
  for name in values:
    flag = values[name]
    default = "" if flag.default in (None, []) else flag.default
    shown = f"--{name}" if isinstance(flag.default, bool) else f"--{name}={default}"
    text = flag.help.splitlines()[0].rstrip(";")  # (absl appends a line to repeatable flags' help)
    lines.append(f"  {shown:<26} {text}")
  return "\n".join(lines)


def version() -> str:
  from importlib import metadata

  from jaxlm import __version__

  stack = ", ".join(f"{name} {metadata.version(name)}" for name in ("jax", "flax", "optax", "orbax-checkpoint"))
  return f"jaxlm {__version__} ({stack})"


def _quiet_libraries() -> None:
  """The CLI's stderr carries jaxlm's own lines. When a checkpoint write fails (measured on a full
  disk), orbax logs it as several ERROR tracebacks, asyncio logs each of its other pending writes
  ("Task exception was never retrieved"), and tensorstore prints a "RuntimeError: Event loop is
  closed" per array from callbacks whose event loop orbax has closed. jaxlm reports the failure itself,
  in one line, or raises it with its traceback."""
  import logging

  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  if getattr(sys.excepthook, "jaxlm", False):
    return
  default = sys.excepthook

  def hook(kind, value, tb):
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      default(kind, value, tb)
  hook.jaxlm = True
  sys.excepthook = hook
  default_unraisable = sys.unraisablehook

  def unraisable(u):
    if not (u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"):
      default_unraisable(u)
  sys.unraisablehook = unraisable


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAXLM_DISTRIBUTED") == "auto":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "4")  # before jaxlib loads: see peers.py
  _quiet_libraries()
  allocator.tune()
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE, end="")
    return 0 if argv else 2
  if argv[0] in ("--version", "-V", "version"):
    print(version())
    return 0
  command, rest = argv[0], argv[1:]
  try:
    if command not in COMMANDS:
      raise UserError(f"unknown command {command!r}", f"commands: {', '.join(COMMANDS)}; see `jaxlm --help`")
    if command in _DEFINES and any(a in ("-h", "--help", "-help") for a in rest):
      print(flags_help(command))
      return 0
    {"train": train, "prepare": prepare, "sample": sample, "eval": evaluate, "plan": plan,
     "plot": plot, "import": import_hf, "export": export_hf}[command](rest)
    code = 0
  except UserError as e:
    print(f"jaxlm: error: {e}", file=sys.stderr, flush=True)
    code = e.exit_code
  except KeyboardInterrupt:
    print("jaxlm: interrupted", file=sys.stderr)
    code = 130
  except Exception:
    if peers := sys.modules.get("jaxlm.peers"):  # (imported by a multi-process start only)
      peers.settle()  # was a peer lost? then the process ends in there, with one line
    raise
  if peers := sys.modules.get("jaxlm.peers"):
    peers.leave(failed=code != 0)
  return code


if __name__ == "__main__":
  sys.exit(main())
