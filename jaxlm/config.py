"""The config schema: every key with its default, its domain and one line of description; validation
that fails with a clear error before anything compiles.

Every experiment file in configs/ starts from `base_config()` and changes what it needs, so a key a user
can set on the command line (`--config.optim.lr=3e-4`) always exists, with a type. `jaxlm train --help`
prints SCHEMA.
"""

import dataclasses
import difflib
import json
import math
import re

import ml_collections

from jaxlm.errors import UserError
from jaxlm.objectives import NAMES as OBJECTIVES

# Logical axis -> mesh axes. Parameters use embed/heads/kv/mlp/vocab, activations batch/seq/act_embed
# (and heads/mlp/vocab). FSDP shards parameters' `embed` over `fsdp` and the batch over data x fsdp;
# tensor parallelism shards heads, MLP and vocabulary over `tensor`. Other parallelisms are other tables.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a numeric key may take: finite, above `low` (or at it, unless `open_low`), below `high`."""

  low: float | None = None
  high: float | None = None
  open_low: bool = False
  open_high: bool = False

  def __contains__(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
      return False
    return self.high is None or (value < self.high or (not self.open_high and value == self.high))

  def __str__(self) -> str:
    if self.high is None and self.low == 0:
      return "positive" if self.open_low else "0 or more"
    if self.high is None:
      return f"{'above' if self.open_low else 'at least'} {self.low:g}"
    return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, open_low=True, open_high=True)  # (0, 1)
BELOW_ONE = Range(0, 1, open_high=True)  # [0, 1)
ANY = None  # any value of the key's type

# (key, default, domain: a Range, a tuple of choices or ANY, description). The one list of config keys.
SCHEMA = (
    ("objective", "clm", OBJECTIVES, "what the model learns: clm (causal LM, a decoder; with a pairs store, "
     "SFT) | mlm (masked LM, a bidirectional encoder) | span (T5 span corruption, an encoder-decoder) | "
     "seq2seq (input -> target pairs, an encoder-decoder)"),
    ("seed", 0, NON_NEGATIVE, "seeds the parameters, the data order, dropout and masks"),
    ("init_from", "", ANY, "a workdir or WORKDIR/STEP whose parameters a fresh run starts from "
     "(fine-tuning; model settings left at their defaults come from it); a resume wins"),
    ("data.path", "", ANY, "a UTF-8 text file or a `jaxlm prepare` store; empty: the built-in fairy tales"),
    ("data.sequences", "windows", ("windows", "packed"),
     "windows: random spans of the token stream | packed: whole documents end to end (a store)"),
    ("data.loader_workers", 0, NON_NEGATIVE, "grain worker processes reading a store (0: background "
     "threads only)"),
    ("data.fairytale_bytes", 4_000_000, POSITIVE, "size of the built-in corpus"),
    ("data.batch_size", 12, POSITIVE, "sequences per step, over all devices and processes"),
    ("data.seq_len", 64, POSITIVE, "tokens per training sequence"),
    ("data.target_len", 0, NON_NEGATIVE, "encoder-decoder: decoder positions per row; 0: what span "
     "corruption of data.seq_len needs (span) or data.seq_len (seq2seq)"),
    ("data.noise_density", 0.15, FRACTION, "span: share of the raw tokens hidden in noise spans"),
    ("data.mean_noise_span_length", 3.0, Range(1), "span: mean length of a noise span"),
    ("data.val_fraction", 0.1, FRACTION, "validation = the last fraction of a text file"),
    ("model.num_layers", 4, POSITIVE, "transformer blocks"),
    ("model.num_heads", 4, POSITIVE, "attention heads"),
    ("model.num_kv_heads", 0, NON_NEGATIVE, "key/value heads of self-attention, dividing num_heads "
     "(grouped-query; 1: multi-query); 0: num_heads"),
    ("model.width", 128, POSITIVE, "residual stream width (d_model)"),
    ("model.mlp_width", 512, POSITIVE, "hidden width of the MLP"),
    ("model.max_seq_len", 256, POSITIVE, "positions the model supports (learned table size, RoPE limit)"),
    ("model.vocab_size", 0, NON_NEGATIVE, "0: the tokenizer's vocabulary, padded to a multiple of 128"),
    ("model.position", "rope", ("rope", "learned"), "rotary or learned absolute positions"),
    ("model.rope_base", 10000.0, POSITIVE, "RoPE's frequency base"),
    ("model.norm", "rmsnorm", ("rmsnorm", "layernorm"), "normalisation before each sublayer"),
    ("model.norm_eps", 1e-6, POSITIVE, "epsilon added to the variance in every norm (GPT-2: 1e-5; Llama: "
     "its config's rms_norm_eps)"),
    ("model.mlp", "gelu", ("gelu", "swiglu"), "MLP kind: gelu (tanh approximation, GPT-2's) | swiglu "
     "(Llama's gated unit)"),
    ("model.tie_embeddings", True, ANY, "the output projection is the input embedding"),
    ("model.use_bias", False, ANY, "biases in linear layers and norms"),
    ("model.dropout", 0.0, BELOW_ONE, "dropout rate in training"),
    ("model.scan_layers", False, ANY, "the blocks' parameters stacked on a leading `layers` axis and "
     "applied with lax.scan: compile time no longer grows with depth"),
    ("model.remat", "none", ("none", "full", "save_dots", "save_projections"), "rematerialisation per "
     "block: none | full (keep only each block's input, recompute the rest in the backward pass) | "
     "save_dots (keep every matmul output) | save_projections (keep the weight matmuls' outputs, "
     "recompute attention); on CPU it saves memory in a scanned stack only"),
    ("model.attention", "einsum", ("einsum", "dot_product", "cudnn", "splash"), "attention: einsum "
     "(jaxlm's) | dot_product (jax.nn.dot_product_attention, XLA) | cudnn (its cuDNN flash kernel, "
     "NVIDIA GPUs, bf16) | splash (the Pallas TPU kernel)"),
    ("model.dtype", "float32", ("float32", "bfloat16"), "compute dtype of matmuls; parameters stay "
     "float32"),
    ("optim.lr", 1e-3, POSITIVE, "peak learning rate, reached at the end of warmup"),
    ("optim.final_lr", 1e-4, NON_NEGATIVE, "learning rate the cosine reaches at the last step (at most "
     "optim.lr)"),
    ("optim.warmup_steps", 100, NON_NEGATIVE, "linear warmup steps (shortened, with a note, to a tenth "
     "of a shorter run)"),
    ("optim.b1", 0.9, BELOW_ONE, "AdamW's first-moment decay"),
    ("optim.b2", 0.99, BELOW_ONE, "AdamW's second-moment decay"),
    ("optim.eps", 1e-8, POSITIVE, "AdamW's epsilon"),
    ("optim.weight_decay", 0.1, NON_NEGATIVE, "AdamW's decoupled weight decay (matrices only)"),
    ("optim.clip_norm", 1.0, NON_NEGATIVE, "global gradient-norm clipping; 0 turns it off"),
    ("optim.grad_accum", 1, POSITIVE, "microbatches per step (one update per step)"),
    ("train.steps", 2000, POSITIVE, "optimizer steps of the whole run"),
    ("train.eval_every", 250, POSITIVE, "steps between evaluations (and at the end)"),
    ("train.eval_batches", 20, POSITIVE, "validation batches per evaluation: val_loss is an estimate "
     "from this fixed sample, `jaxlm eval` reads every token"),
    ("train.checkpoint_every", 500, POSITIVE, "steps between checkpoints (and at the end)"),
    ("train.keep_checkpoints", 3, POSITIVE, "the newest K checkpoints are kept..."),
    ("train.keep_best", True, ANY, "...and the one with the lowest val_loss (an evaluated checkpoint step)"),
    ("train.log_every", 10, POSITIVE, "steps between training lines in metrics.jsonl, TensorBoard and the "
     "console"),
    ("train.step_timeout", 0.0, Range(-1), "seconds a step, evaluation or save may take before the run "
     "ends with every thread's stack (a stuck or stopped process); 0: automatic with several processes "
     "(2x the first step + (10 + eval_batches) x the median step + 60 s), off in one; -1: off"),
    ("train.sample_tokens", 200, NON_NEGATIVE, "tokens sampled from the model at the end of training; "
     "0: none"),
    ("train.sample_prompt", "\n", ANY, "the prompt of that sample"),
    ("train.profile_steps", "", ANY, "START,STOP: a jax.profiler trace of steps START to STOP (as numbered "
     "in metrics.jsonl) in WORKDIR/profile, for TensorBoard or XProf; empty: off"),
    ("mesh.data", -1, ANY, "data-parallel size (-1: all remaining devices)"),
    ("mesh.fsdp", 1, ANY, "FSDP size: parameters and optimizer state sharded over it"),
    ("mesh.tensor", 1, ANY, "tensor-parallel size: heads, MLP and vocabulary sharded over it"),
    ("mesh.rules", DEFAULT_RULES, ANY, "logical axis -> mesh axes table (see config.py)"),
    ("mesh.cpu_devices", 0, NON_NEGATIVE, ">0: split the host CPU into this many JAX devices (a CPU "
     "speed lever)"),
)


def base_config() -> ml_collections.ConfigDict:
  """Every key of SCHEMA at its default."""
  c = ml_collections.ConfigDict()
  for key, default, _, _ in SCHEMA:
    node = c
    *sections, name = key.split(".")
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[name] = default
  return c


def describe(c: ml_collections.ConfigDict) -> str:
  """One line per key: its name, its value in `c` and its description (for `jaxlm train --help`)."""
  lines = []
  for key, _, domain, text in SCHEMA:
    value = _get(c, key)
    shown = f"({len(value)} entries)" if isinstance(value, tuple) and len(repr(value)) > 24 else repr(value)
    allowed = f" [{'|'.join(domain)}]" if isinstance(domain, tuple) else ""
    lines.append(f"  {key:<24} {shown:<14} {text}{allowed}")
  return "\n".join(lines)


def _get(c: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split("."):
    c = c[part]
  return c


def mesh_shape(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 resolved to all remaining devices."""
  sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1",
                    "give the others explicit sizes")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh sizes must be positive or -1, got {tuple(sizes)}", "e.g. --config.mesh.data=-1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f"mesh {tuple(sizes)} cannot fill {num_devices} devices: {known} does not divide "
                      f"{num_devices}", "choose mesh sizes whose product divides the device count")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(f"mesh data x fsdp x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)} "
                    f"devices, but there are {num_devices}",
                    "make the product equal the device count, or set one axis to -1")
  return tuple(sizes)


def check_keys(c: ml_collections.ConfigDict, source: str = "the config") -> None:
  """Every key of `c` is one of SCHEMA's (a config file may not invent keys: a typo would be ignored)."""
  known = {key for key, *_ in SCHEMA}
  for key in sorted(flatten(c.to_dict())):
    if key not in known:
      raise UserError(f"{source} sets {key}, which is not a config key",
                      f"see `jaxlm train --help` for the keys{suggest(key, known)}")


def suggest(key: str, known) -> str:
  """'; did you mean X?' for the known key most like `key`, or ''."""
  close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
  return f"; did you mean {close[0]}?" if close else ""


def _check_domains(c: ml_collections.ConfigDict) -> None:
  for key, default, domain, _ in SCHEMA:
    value = _get(c, key)
    if isinstance(domain, tuple) and value not in domain:
      raise UserError(f"{key} is {value!r}, not one of {', '.join(domain)}", f"set --config.{key}={domain[0]}")
    if isinstance(domain, Range) and value not in domain:
      raise UserError(f"{key} must be {domain}, got {value!r}", f"e.g. --config.{key}={default!r}")


def check_utf8(what: str, text: str) -> None:
  """Text from the command line must be UTF-8 (undecodable bytes arrive as lone surrogates)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
    shown = f"byte 0x{byte:02x}" if byte is not None else f"character U+{ord(text[e.start]):04X}"
    raise UserError(f"{what} is not valid UTF-8 ({shown} at position {e.start})",
                    "give the text in UTF-8, e.g. check your terminal's encoding") from None


def _check_rules(rules) -> None:
  for rule in rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    axes = rule[1] if ok else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not ok or not isinstance(axes, (tuple, list)) or any(a not in MESH_AXES for a in axes):
      raise UserError(f"mesh.rules has the entry {rule!r}; each is (logical name, None | mesh axis | "
                      f"tuple of mesh axes) with mesh axes {', '.join(MESH_AXES)}",
                      "e.g. ('embed', 'fsdp'); see DEFAULT_RULES in jaxlm/config.py")


ATTENTION_PLATFORMS = {"cudnn": ("gpu", "an NVIDIA GPU"), "splash": ("tpu", "a TPU")}


def _check_attention(attention: str) -> None:
  if attention in ATTENTION_PLATFORMS:
    import jax

    platform, name = ATTENTION_PLATFORMS[attention]
    if jax.default_backend() != platform:
      raise UserError(f"model.attention={attention} runs on {name}; this machine's JAX backend is "
                      f"{jax.default_backend()}", "use model.attention=einsum or dot_product here")


def profile_window(c: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """train.profile_steps as (START, STOP), the first and the last traced step; None when it is empty."""
  text, steps = c.train.profile_steps, c.train.steps
  if not text.strip():
    return None
  hint = (f"give START,STOP with 1 <= START < STOP <= train.steps={steps}, e.g. --config.train.profile_steps="
          f"{min(2, steps - 1)},{min(5, steps)}" if steps > 1 else "a window needs train.steps of at least 2")
  if not (numbers := re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*", text)):
    raise UserError(f"train.profile_steps is {text!r}, not two step numbers START,STOP", hint)
  start, stop = int(numbers[1]), int(numbers[2])
  if start < 1:
    raise UserError(f"train.profile_steps starts at step {start}; steps count from 1", hint)
  if start >= stop:
    raise UserError(f"train.profile_steps {text}: START {start} is not below STOP {stop}", hint)
  if stop > steps:
    raise UserError(f"train.profile_steps {text} ends after the last step, train.steps={steps}", hint)
  return start, stop


def validate(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks everything that can be checked before data or compile; returns the mesh shape."""
  check_keys(c)
  _check_domains(c)
  _check_rules(c.mesh.rules)
  check_utf8("train.sample_prompt", c.train.sample_prompt)
  profile_window(c)
  m = c.model
  if c.optim.final_lr > c.optim.lr:
    raise UserError(f"optim.final_lr {c.optim.final_lr:g} is above the peak optim.lr {c.optim.lr:g}",
                    f"set --config.optim.final_lr to at most {c.optim.lr:g}, e.g. a tenth of it")
  if m.width % m.num_heads:
    raise UserError(f"model.width {m.width} is not divisible by model.num_heads {m.num_heads}",
                    "choose a width that is a multiple of the number of heads")
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    raise UserError(f"model.num_kv_heads {m.num_kv_heads} does not divide model.num_heads {m.num_heads}",
                    "choose a divisor of num_heads (1: multi-query), or 0 for one key/value head per head")
  _check_attention(m.attention)
  if m.position == "rope" and (m.width // m.num_heads) % 2:
    raise UserError(f"RoPE needs an even head width, got {m.width // m.num_heads}",
                    "change model.width or model.num_heads, or set model.position=learned")
  if c.data.seq_len > m.max_seq_len:
    raise UserError(f"data.seq_len {c.data.seq_len} is longer than model.max_seq_len {m.max_seq_len}",
                    "shorten data.seq_len or raise model.max_seq_len")
  data, fsdp, tensor = shape = mesh_shape(c, num_devices)
  batch_shards = data * fsdp
  if c.data.batch_size % batch_shards:
    raise UserError(f"global batch data.batch_size={c.data.batch_size} is not divisible by the "
                    f"data-parallel size mesh.data x mesh.fsdp = {batch_shards}",
                    f"use a batch size that is a multiple of {batch_shards}")
  micro = c.data.batch_size // c.optim.grad_accum
  if c.data.batch_size % c.optim.grad_accum or micro % batch_shards:
    raise UserError(f"data.batch_size {c.data.batch_size} does not split into optim.grad_accum="
                    f"{c.optim.grad_accum} microbatches divisible by the data-parallel size {batch_shards}",
                    "make batch_size a multiple of grad_accum x data x fsdp")
  for name, size in (("model.num_heads", m.num_heads), ("model.mlp_width", m.mlp_width)):
    if size % tensor:
      raise UserError(f"{name} {size} is not divisible by mesh.tensor {tensor}",
                      "choose a tensor-parallel size that divides it")
  kv_heads = m.num_kv_heads or m.num_heads
  if kv_heads % tensor and dict(c.mesh.rules).get("kv_heads"):
    raise UserError(f"model.num_kv_heads {kv_heads} is not divisible by mesh.tensor {tensor}",
                    "choose a tensor-parallel size that divides it, or replicate the key/value heads: give "
                    "mesh.rules with ('kv_heads', None)")
  rules = dict(c.mesh.rules)
  if m.attention == "splash" and 1 < kv_heads and tensor > 1 and rules.get("kv_heads") != rules.get("heads"):
    raise UserError("model.attention=splash shards key/value heads as the query heads, but mesh.rules give "
                    f"kv_heads {rules.get('kv_heads')!r} and heads {rules.get('heads')!r}",
                    "use the same rule for both, or model.attention=dot_product")
  if m.width % fsdp:
    raise UserError(f"model.width {m.width} is not divisible by mesh.fsdp {fsdp}",
                    "choose an FSDP size that divides the width")
  return shape


def resolved(c: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A copy of `c` with what a run adjusts by itself, and one note per adjustment.

  A warmup as long as the run (a quick `--config.train.steps=30` against a default warmup of 100) is
  shortened to a tenth of the run rather than refused.
  """
  c, notes = c.copy_and_resolve_references(), []
  if c.optim.warmup_steps >= c.train.steps:
    short = c.train.steps // 10
    notes.append(f"optim.warmup_steps {c.optim.warmup_steps} is not below train.steps {c.train.steps}: "
                 f"warming up over {short} steps instead")
    c.optim.warmup_steps = short
  return c, notes


# Keys that change the shapes of the parameters (or what they mean): a workdir's checkpoints only
# fit a config that agrees on them. Everything else (mesh, steps, learning rate...) may change on resume.
SHAPE_KEYS = ("objective", "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.width",
              "model.mlp_width", "model.scan_layers",
              "model.max_seq_len", "model.vocab_size", "model.position", "model.norm", "model.mlp",
              "model.tie_embeddings", "model.use_bias")


def resume_changes(saved: dict, c: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Compares the config a workdir was trained with to `c`.

  Raises a UserError if a shape key differs; returns the other changed keys as "key: old -> new".
  """
  old, new = flatten(saved), flatten(json.loads(to_json(c)))
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  for key in changed:
    if key in SHAPE_KEYS:
      raise UserError(f"{workdir} was trained with {key}={old.get(key)!r}; this run asks for "
                      f"{new.get(key)!r}, which changes the model its checkpoints hold",
                      f"drop --config.{key} to resume this run, or give a new --workdir to start fresh")
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def config_from_json(saved: dict, source: str) -> ml_collections.ConfigDict:
  """A workdir's config.json as a config; keys added to jaxlm since it was written keep their defaults."""
  config, known = base_config(), {key for key, *_ in SCHEMA}
  values = flatten(saved) if isinstance(saved, dict) else {"": saved}
  for key, value in values.items():
    if key not in known:
      raise UserError(f"{source} has the key {key!r}, which this jaxlm does not know",
                      "it was written by another jaxlm version; use that version, or train a new workdir")
    current = _get(config, key)
    if isinstance(current, tuple) and isinstance(value, list):  # JSON has lists, not tuples
      value = _tuples(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if type(value) is not type(current):
      raise UserError(f"{source}: {key} is {value!r}, not a {type(current).__name__}",
                      "restore the file, or train again in a new workdir")
    config.update_from_flattened_dict({key: value})
  return config


def _tuples(x):
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def to_json(c: ml_collections.ConfigDict) -> str:
  return json.dumps(c.to_dict(), indent=2, sort_keys=True, default=list)
