"""The config schema with its defaults, and validation that fails with a clear error before any compile.

Every experiment file in configs/ starts from `base_config()` and changes what it needs, so a key a user
can set on the command line (`--config.optim.lr=3e-4`) always exists, with a type.
"""

import json
import math

import ml_collections

from jaxlm.errors import UserError

# Logical axis -> mesh axes. Parameters use embed/heads/kv/mlp/vocab, activations batch/seq/act_embed
# (and heads/mlp/vocab). FSDP shards parameters' `embed` over `fsdp` and the batch over data x fsdp;
# tensor parallelism shards heads, MLP and vocabulary over `tensor`. Other parallelisms are other tables.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # a workdir or WORKDIR/STEP: start from its parameters (fine-tuning); a resume wins

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # a UTF-8 text file or a `jaxlm prepare` store; empty: the built-in fairy tales
  c.data.sequences = "windows"  # windows: random spans of the token stream | packed: whole documents (a store)
  c.data.loader_workers = 0  # grain worker processes reading a store (0: background threads only)
  c.data.fairytale_bytes = 4_000_000  # size of the built-in corpus
  c.data.batch_size = 12  # global, over all devices and processes
  c.data.seq_len = 64
  c.data.val_fraction = 0.1  # validation = the last fraction of the text

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.width = 128
  c.model.mlp_width = 512
  c.model.max_seq_len = 256  # positions the model supports (learned table size, RoPE limit)
  c.model.vocab_size = 0  # 0: the tokenizer's vocabulary, padded to a multiple of 128
  c.model.position = "rope"  # rope | learned
  c.model.rope_base = 10000.0
  c.model.norm = "rmsnorm"  # rmsnorm | layernorm
  c.model.mlp = "gelu"  # gelu | swiglu
  c.model.tie_embeddings = True
  c.model.use_bias = False
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # compute dtype of matmuls; parameters stay float32

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3  # peak learning rate, reached at the end of warmup
  c.optim.final_lr = 1e-4  # reached by the cosine at the last step
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0  # global gradient norm; 0 turns clipping off
  c.optim.grad_accum = 1  # microbatches per step (one update per step)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000
  c.train.eval_every = 250
  c.train.eval_batches = 20
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3  # the newest K are kept...
  c.train.keep_best = True  # ...and the one with the lowest val_loss (evaluated at a checkpoint step)
  c.train.log_every = 10
  c.train.sample_tokens = 200  # sampled from the model at the end of training; 0: none
  c.train.sample_prompt = "\n"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = DEFAULT_RULES
  c.mesh.cpu_devices = 0  # >0: split the host CPU into this many JAX devices (a CPU speed lever)
  return c


_CHOICES = {
    "model.position": ("rope", "learned"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.mlp": ("gelu", "swiglu"),
    "model.dtype": ("float32", "bfloat16"),
    "data.sequences": ("windows", "packed"),
}

_POSITIVE = ("data.batch_size", "data.seq_len", "model.num_layers", "model.num_heads", "model.width",
             "model.mlp_width", "model.max_seq_len", "optim.grad_accum", "train.steps",
             "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.log_every",
             "train.keep_checkpoints", "data.fairytale_bytes")


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


def validate(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks everything that can be checked before data or compile; returns the mesh shape."""
  for key in _POSITIVE:
    if _get(c, key) <= 0:
      raise UserError(f"{key} must be positive, got {_get(c, key)}", f"set --config.{key}=N with N > 0")
  for key, choices in _CHOICES.items():
    if _get(c, key) not in choices:
      raise UserError(f"{key} is {_get(c, key)!r}, not one of {', '.join(choices)}",
                      f"set --config.{key}={choices[0]}")
  m = c.model
  if m.width % m.num_heads:
    raise UserError(f"model.width {m.width} is not divisible by model.num_heads {m.num_heads}",
                    "choose a width that is a multiple of the number of heads")
  if m.position == "rope" and (m.width // m.num_heads) % 2:
    raise UserError(f"RoPE needs an even head width, got {m.width // m.num_heads}",
                    "change model.width or model.num_heads, or set model.position=learned")
  if c.data.seq_len > m.max_seq_len:
    raise UserError(f"data.seq_len {c.data.seq_len} is longer than model.max_seq_len {m.max_seq_len}",
                    "shorten data.seq_len or raise model.max_seq_len")
  if c.data.loader_workers < 0:
    raise UserError(f"data.loader_workers must be 0 or more, got {c.data.loader_workers}",
                    "e.g. --config.data.loader_workers=2")
  if not 0.0 < c.data.val_fraction < 1.0:
    raise UserError(f"data.val_fraction must be in (0, 1), got {c.data.val_fraction}",
                    "e.g. --config.data.val_fraction=0.1")
  if not 0.0 <= m.dropout < 1.0:
    raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}", "e.g. --config.model.dropout=0.1")
  if c.optim.warmup_steps >= c.train.steps:
    raise UserError(f"optim.warmup_steps {c.optim.warmup_steps} is not below train.steps {c.train.steps}",
                    "shorten the warmup or train longer")
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
  if m.width % fsdp:
    raise UserError(f"model.width {m.width} is not divisible by mesh.fsdp {fsdp}",
                    "choose an FSDP size that divides the width")
  return shape


# Keys that change the shapes of the parameters (or what a token means): a workdir's checkpoints only
# fit a config that agrees on them. Everything else (mesh, steps, learning rate...) may change on resume.
SHAPE_KEYS = ("model.num_layers", "model.num_heads", "model.width", "model.mlp_width",
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
                      f"{new.get(key)!r}, which changes the parameters' shapes",
                      f"drop --config.{key} to resume this run, or give a new --workdir to start fresh")
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


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
