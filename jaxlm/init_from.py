"""Fine-tuning's source (`--config.init_from=W`): what a run takes from it besides its parameters.

The model a checkpoint holds is defined by settings, not only by shapes: a run that starts from W adopts W's
model settings (`MODEL_KEYS`) wherever its own config leaves them at their defaults, so fine-tuning an import
(`jaxlm import`: GPT-2's LayerNorm eps, Llama's RoPE base) needs no restating of them (configs/finetune.py
sets none). A config that gives one a different value is refused, naming each, except for the positions and
RoPE's base (`RETUNABLE`), which a fine-tuning run may change on purpose (longer context). The source must
have trained the same model family, and the run's data must be tokenized with the source's tokenizer.
"""

from jaxlm import files, objectives
from jaxlm.checkpoint import resolve_checkpoint
from jaxlm.config import SCHEMA, flatten
from jaxlm.data.tokenizer import load_tokenizer_json
from jaxlm.errors import UserError
from jaxlm.objectives.base import with_article
from jaxlm.workdir import saved_config

# The settings that define the function a model's parameters compute (training knobs such as dropout,
# scan_layers, remat, attention and dtype stay the run's own).
MODEL_KEYS = ("model.num_layers", "model.num_heads", "model.num_kv_heads", "model.width", "model.mlp_width",
              "model.max_seq_len", "model.vocab_size", "model.position", "model.rope_base", "model.norm",
              "model.norm_eps", "model.mlp", "model.tie_embeddings", "model.use_bias")
RETUNABLE = ("model.max_seq_len", "model.rope_base")
_DEFAULTS = {key: default for key, default, *_ in SCHEMA}


def source_workdir(init_from: str) -> str:
  """The workdir of init_from (W, W/STEP or W/checkpoints/STEP); a bad path is one error line."""
  directory, _ = resolve_checkpoint(init_from)
  return files.split(directory)[0]


def adopt_model(config, workdir: str):
  """(config with the source's model settings where it has the defaults, the adopted "key=value"s).

  Resuming, the source is the workdir's own saved config (which adopted them at the start)."""
  if not config.init_from:
    return config, []
  saved = saved_config(workdir) or saved_config(source_workdir(config.init_from))
  if saved is None:
    return config, []  # (a bare checkpoint folder: its shapes are still checked)
  theirs, config = flatten(saved), config.copy_and_resolve_references()
  adopted, conflicts = [], []
  for key in MODEL_KEYS:
    section, name = key.split(".")
    mine, default = config[section][name], _DEFAULTS[key]
    if key not in theirs or theirs[key] == mine:
      continue
    if mine == default:
      config[section][name] = float(theirs[key]) if isinstance(default, float) else theirs[key]
      adopted.append(f"{key}={theirs[key]}")
    elif key not in RETUNABLE:
      conflicts.append((key, theirs[key], mine))
  if conflicts:
    listed = ", ".join(f"{k}={t!r} there, {m!r} here" for k, t, m in conflicts)
    raise UserError(f"init_from={config.init_from} holds another model: {listed}", "leave the model settings "
                    "out of the config (configs/finetune.py does) and they come from init_from")
  return config, adopted


def check_family(config, source: str) -> None:
  """init_from's run must have trained the model family this objective trains."""
  if (saved := saved_config(source)) is None:
    return  # (a bare checkpoint folder: the parameters' shapes are still checked)
  theirs = saved.get("objective", "clm")
  mine, other = objectives.get(config.objective), objectives.get(theirs)
  if other.family != mine.family:
    raise UserError(f"init_from={config.init_from} is {with_article(other.family)} (objective {theirs}); "
                    f"objective {config.objective} trains {with_article(mine.family)}",
                    f"start from a run of objective {config.objective}, or drop --config.init_from")


def check_tokenizer(config, tokenizer) -> None:
  """The run's data must be in the source's token ids (else its embeddings mean other tokens)."""
  source = source_workdir(config.init_from)
  path = files.join(source, "tokenizer.json")
  if not files.isfile(path):
    return
  theirs = load_tokenizer_json(files.read_text(path), path)
  if theirs.to_json() != tokenizer.to_json():
    raise UserError(f"init_from={config.init_from} was trained with another tokenizer ({_about(theirs)}) than "
                    f"this run's data ({_about(tokenizer)})", f"tokenize the data with its tokenizer: jaxlm prepare "
                    f"--input=FILES --output=DIR --tokenizer={path}, then --config.data.path=DIR")


def _about(tokenizer) -> str:
  return f"{tokenizer.name}, {tokenizer.vocab_size:,} ids"
