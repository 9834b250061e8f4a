"""Hugging Face tensors <-> jaxlm parameters by name (pure: numpy in, numpy out), through layouts.py's rules.

Our names are checkpoint.path_name's ("blocks/0/attn/qkv"); a scanned stack's parameters ("blocks/attn/qkv",
with a leading layers axis) are the unrolled ones stacked.
"""

import numpy as np

from jaxlm.errors import UserError
from jaxlm.interop import layouts

_BLOCK = "blocks/"


def _normalised(tensors: dict, family: str) -> dict:
  """GPT2Model's names (no "transformer." prefix) as GPT2LMHeadModel's; buffers dropped."""
  kept = {n: x for n, x in tensors.items() if not n.endswith(layouts.IGNORED_SUFFIXES)}
  if family == "gpt2" and not any(n.startswith(layouts.GPT2_PREFIX) for n in kept):
    kept = {(n if n.startswith("lm_head.") else layouts.GPT2_PREFIX + n): x for n, x in kept.items()}
  return kept


def to_ours(tensors: dict, family: str, m, source: str) -> dict[str, np.ndarray]:
  """jaxlm's float32 parameters by name from a checkpoint's tensors; every tensor must be accounted for and
  have the shape config.json implies (else one error line naming it and both shapes)."""
  tensors = _normalised(tensors, family)
  rules = layouts.expand(*layouts.rules_for(family, m), m.num_layers, with_biases=m.use_bias)
  wanted = {name: shape for _, r in rules for name, shape in zip(r.theirs, r.shapes)}
  _check_names(tensors, wanted, m, source)
  ours = {}
  for name, rule in rules:
    parts = [np.asarray(tensors[t], np.float32) for t in rule.theirs]
    ours[name] = np.asarray(rule.join(*parts), np.float32)
  return ours


def _check_names(tensors: dict, wanted: dict, m, source: str) -> None:
  for name, shape in wanted.items():
    if name not in tensors:
      raise UserError(f"{source} has no tensor {name}, which its config.json implies",
                      "the weights and config.json are of different models")
    if tuple(tensors[name].shape) != tuple(shape):
      raise UserError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, but config.json implies "
                      f"{tuple(shape)}", "the weights and config.json are of different models")
  extra = sorted(set(tensors) - set(wanted))
  if extra == ["lm_head.weight"] and m.tie_embeddings:
    embedding = next(n for n in wanted if n.endswith(("wte.weight", "embed_tokens.weight")))
    if np.array_equal(tensors["lm_head.weight"], tensors[embedding]):
      return  # (a tied head saved twice)
    raise UserError(f"{source} has an lm_head.weight that differs from its embedding, but config.json says "
                    "tie_word_embeddings=true", "set tie_word_embeddings to false in config.json")
  if extra:
    raise UserError(f"{source} has {len(extra)} tensor{'s' * (len(extra) > 1)} jaxlm does not map, e.g. {extra[0]}",
                    "the weights hold a feature of another architecture; jaxlm imports plain GPT-2 and Llama")


def to_theirs(ours: dict[str, np.ndarray], family: str, m, dtype) -> dict[str, np.ndarray]:
  """A Hugging Face checkpoint's tensors (in `dtype`) from jaxlm's parameters by name (unrolled)."""
  with_biases = family == "gpt2" or m.use_bias  # (GPT-2 always has biases: zeros where ours has none)
  out = {}
  for name, rule in layouts.expand(*layouts.rules_for(family, m), m.num_layers, with_biases):
    if name in ours:
      parts = rule.split(ours[name])
    elif rule.bias:
      parts = [np.zeros(s, np.float32) for s in rule.shapes]
    else:
      raise KeyError(f"jaxlm parameter {name} is missing")  # (a bug: export_family checked the model)
    for t, x in zip(rule.theirs, parts):
      out[t] = np.ascontiguousarray(x).astype(dtype, copy=False)
  return out


def stacked(ours: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """Unrolled names (blocks/i/...) -> a scanned stack's (blocks/..., layers leading)."""
  out = {n: x for n, x in ours.items() if not n.startswith(_BLOCK)}
  inner = sorted({n.split("/", 2)[2] for n in ours if n.startswith(_BLOCK)})
  for n in inner:
    out[_BLOCK + n] = np.stack([ours[f"{_BLOCK}{i}/{n}"] for i in range(num_layers)])
  return out


def unstacked(ours: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """The reverse of `stacked`: a scanned stack's names -> blocks/i/..."""
  out = {}
  for n, x in ours.items():
    if n.startswith(_BLOCK) and not n.split("/")[1].isdigit():
      out.update({f"{_BLOCK}{i}/{n[len(_BLOCK):]}": x[i] for i in range(num_layers)})
    else:
      out[n] = x
  return out
