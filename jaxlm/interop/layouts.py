"""Which Hugging Face tensors make which jaxlm parameter, and how: the one table import and export share.

A `Rule` names a jaxlm parameter (inside block i, or outside the blocks), the Hugging Face tensors it is made
of, with the shapes config.json implies, and the two exact rearrangements between them (reshapes, transposes
and stacks only, so a round trip is bitwise). GPT-2's `Conv1D` weights are (in, out) with q|k|v fused on the
last axis; Llama's `nn.Linear` weights are (out, in) with separate q, k and v.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

# Tensors of a Hugging Face checkpoint that are buffers, not weights (GPT-2's causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# GPT2LMHeadModel's names start with this; GPT2Model's (and OpenAI's original upload's) do not.
GPT2_PREFIX = "transformer."


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str  # a parameter path: "embed", or "attn/qkv" inside each block
  theirs: tuple[str, ...]  # Hugging Face names; "{i}" is the layer
  shapes: tuple[tuple[int, ...], ...]  # theirs' shapes, as config.json implies them
  join: Callable  # (*their arrays) -> ours
  split: Callable  # ours -> tuple of theirs
  bias: bool = False  # a bias: exported as zeros where our model has none


def _same(x):
  return x


def _t(x):
  return x.T


def _plain(ours, theirs, shape, bias=False, transpose=False) -> Rule:
  f = _t if transpose else _same
  return Rule(ours, (theirs,), (shape,), f, lambda x: (f(x),), bias)


def _reshaped(ours, theirs, shape, ours_shape, bias=False) -> Rule:
  return Rule(ours, (theirs,), (shape,), lambda x: x.reshape(ours_shape), lambda x: (x.reshape(shape),), bias)


def _stacked_linear(ours, theirs, d, heads, k, bias=False) -> Rule:
  """n (heads*K, D) nn.Linear weights (or (heads*K,) biases) -> ours (D, n, heads, K) (or (n, heads, K));
  one -> (D, heads, K) (or (heads, K))."""
  n = len(theirs)
  if bias:
    shapes = ((heads * k,),) * n
    join = lambda *xs: np.stack(xs).reshape((n, heads, k) if n > 1 else (heads, k))
    split = lambda x: tuple(x.reshape(n, heads * k))
  else:
    shapes = ((heads * k, d),) * n
    join = lambda *xs: np.stack([x.T for x in xs], 1).reshape((d, n, heads, k) if n > 1 else (d, heads, k))
    split = lambda x: tuple(p.T for p in np.moveaxis(x.reshape(d, n, heads * k), 1, 0))
  return Rule(ours, theirs, shapes, join, split, bias)


def gpt2_rules(m) -> tuple[list[Rule], list[Rule]]:
  """(rules outside the blocks, rules of block {i}) for a GPT-2 model."""
  d, h, f, v = m.width, m.num_heads, m.mlp_width, m.vocab_size
  k = d // h
  t = GPT2_PREFIX
  top = [_plain("embed", t + "wte.weight", (v, d)), _plain("pos_embed", t + "wpe.weight", (m.max_seq_len, d)),
         _plain("final_norm/scale", t + "ln_f.weight", (d,)), _plain("final_norm/bias", t + "ln_f.bias", (d,))]
  if not m.tie_embeddings:
    top.append(_plain("lm_head", "lm_head.weight", (v, d), transpose=True))
  p = t + "h.{i}."
  block = [_plain("attn_norm/scale", p + "ln_1.weight", (d,)), _plain("attn_norm/bias", p + "ln_1.bias", (d,)),
           _reshaped("attn/qkv", p + "attn.c_attn.weight", (d, 3 * d), (d, 3, h, k)),
           _reshaped("attn/qkv_bias", p + "attn.c_attn.bias", (3 * d,), (3, h, k), bias=True),
           _reshaped("attn/out", p + "attn.c_proj.weight", (d, d), (h, k, d)),
           _plain("attn/out_bias", p + "attn.c_proj.bias", (d,), bias=True),
           _plain("mlp_norm/scale", p + "ln_2.weight", (d,)), _plain("mlp_norm/bias", p + "ln_2.bias", (d,)),
           _plain("mlp/up", p + "mlp.c_fc.weight", (d, f)), _plain("mlp/up_bias", p + "mlp.c_fc.bias", (f,), bias=True),
           _plain("mlp/down", p + "mlp.c_proj.weight", (f, d)),
           _plain("mlp/down_bias", p + "mlp.c_proj.bias", (d,), bias=True)]
  return top, block


def llama_rules(m) -> tuple[list[Rule], list[Rule]]:
  """The same for a Llama model (grouped-query when num_kv_heads < num_heads)."""
  d, h, g, f, v = m.width, m.num_heads, m.kv_heads, m.mlp_width, m.vocab_size
  k = d // h
  top = [_plain("embed", "model.embed_tokens.weight", (v, d)), _plain("final_norm/scale", "model.norm.weight", (d,))]
  if not m.tie_embeddings:
    top.append(_plain("lm_head", "lm_head.weight", (v, d), transpose=True))
  p = "model.layers.{i}."
  q, kk, vv, o = (p + f"self_attn.{n}_proj" for n in ("q", "k", "v", "o"))
  if g == h:
    attn = [_stacked_linear("attn/qkv", (q + ".weight", kk + ".weight", vv + ".weight"), d, h, k),
            _stacked_linear("attn/qkv_bias", (q + ".bias", kk + ".bias", vv + ".bias"), d, h, k, bias=True)]
  else:
    attn = [_stacked_linear("attn/q", (q + ".weight",), d, h, k),
            _stacked_linear("attn/kv", (kk + ".weight", vv + ".weight"), d, g, k),
            _stacked_linear("attn/q_bias", (q + ".bias",), d, h, k, bias=True),
            _stacked_linear("attn/kv_bias", (kk + ".bias", vv + ".bias"), d, g, k, bias=True)]
  out = Rule("attn/out", (o + ".weight",), ((d, h * k),), lambda x: x.T.reshape(h, k, d),
             lambda x: (x.reshape(h * k, d).T,))
  mlp = p + "mlp."
  block = [_plain("attn_norm/scale", p + "input_layernorm.weight", (d,)), *attn, out,
           _plain("attn/out_bias", o + ".bias", (d,), bias=True),
           _plain("mlp_norm/scale", p + "post_attention_layernorm.weight", (d,)),
           _plain("mlp/gate", mlp + "gate_proj.weight", (f, d), transpose=True),
           _plain("mlp/gate_bias", mlp + "gate_proj.bias", (f,), bias=True),  # (jaxlm's gate has none: zeros)
           _plain("mlp/up", mlp + "up_proj.weight", (f, d), transpose=True),
           _plain("mlp/up_bias", mlp + "up_proj.bias", (f,), bias=True),
           _plain("mlp/down", mlp + "down_proj.weight", (d, f), transpose=True),
           _plain("mlp/down_bias", mlp + "down_proj.bias", (d,), bias=True)]
  return top, block


def rules_for(family: str, m) -> tuple[list[Rule], list[Rule]]:
  return (gpt2_rules if family == "gpt2" else llama_rules)(m)


def expand(top: list[Rule], block: list[Rule], num_layers: int, with_biases: bool) -> list[tuple[str, Rule]]:
  """(our full parameter name, its rule with layer i's Hugging Face names) for every parameter; bias rules
  only `with_biases`."""
  out = [(r.ours, r) for r in top if with_biases or not r.bias]
  for i in range(num_layers):
    for r in block:
      if with_biases or not r.bias:
        named = dataclasses.replace(r, theirs=tuple(t.format(i=i) for t in r.theirs))
        out.append((f"blocks/{i}/{r.ours}", named))
  return out
