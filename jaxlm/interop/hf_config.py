"""Hugging Face config.json <-> jaxlm's model settings, for the GPT-2 and Llama families.

Each family is a set of real model options (config.py): GPT-2 is learned positions, LayerNorm with biases
(eps 1e-5), the tanh GELU and a tied head; Llama is split-half RoPE, RMSNorm (its eps), SwiGLU, an untied
head (or tied, as config.json says) and grouped-query attention. A feature jaxlm does not have is refused
by name rather than approximated.
"""

from jaxlm.errors import UserError

FAMILIES = ("gpt2", "llama")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def family_of(hf: dict, source: str) -> str:
  """'gpt2' or 'llama' from config.json's model_type (or its architectures), else one error line."""
  kind = hf.get("model_type")
  if kind in FAMILIES:
    return kind
  archs = ", ".join(hf.get("architectures") or []) or "none given"
  raise UserError(f"{source} is model_type {kind!r} (architectures: {archs}), which jaxlm does not import",
                  "jaxlm imports the gpt2 and llama families (GPT2LMHeadModel, LlamaForCausalLM)")


def model_settings(hf: dict, source: str) -> dict:
  """jaxlm's model.* settings (without the prefix) for a GPT-2 or Llama config.json."""
  family = family_of(hf, source)
  settings = _gpt2(hf, source) if family == "gpt2" else _llama(hf, source)
  for key in ("num_layers", "num_heads", "width", "mlp_width", "max_seq_len", "vocab_size"):
    if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
      raise UserError(f"{source}: {key} comes out as {settings[key]!r}", "config.json must give positive integers")
  if settings["width"] % settings["num_heads"]:
    raise UserError(f"{source}: hidden size {settings['width']} is not divisible by {settings['num_heads']} heads",
                    "the config.json does not describe a model transformers can build")
  return settings


def _unsupported(source: str, feature: str, why: str) -> UserError:
  return UserError(f"{source} uses {feature}, which jaxlm's models do not have", why)


def _gpt2(hf: dict, source: str) -> dict:
  act = hf.get("activation_function", "gelu_new")
  if act not in _TANH_GELU:
    raise _unsupported(source, f"activation_function={act!r}", "jaxlm's GPT-2 MLP is the tanh GELU (gelu_new)")
  for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
    if hf.get(key, want) != want:
      raise _unsupported(source, f"{key}={hf[key]}", f"jaxlm's attention is GPT-2's with {key}={want}")
  width = hf.get("n_embd", 768)
  return {"num_layers": hf.get("n_layer", 12), "num_heads": hf.get("n_head", 12), "num_kv_heads": 0,
          "width": width, "mlp_width": hf.get("n_inner") or 4 * width, "max_seq_len": hf.get("n_positions", 1024),
          "vocab_size": hf.get("vocab_size", 50257), "position": "learned", "norm": "layernorm",
          "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "mlp": "gelu",
          "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "use_bias": True}


def _rope_base(hf: dict, source: str) -> float:
  """RoPE's base from `rope_parameters` (transformers 5) or `rope_theta` (4.x); scaled RoPE is refused."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise _unsupported(source, f"scaled rotary positions (rope_type={kind!r})",
                       "jaxlm's RoPE is the unscaled one (rope_type 'default')")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama(hf: dict, source: str) -> dict:
  if hf.get("hidden_act", "silu") != "silu":
    raise _unsupported(source, f"hidden_act={hf['hidden_act']!r}", "jaxlm's SwiGLU gate is silu")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise _unsupported(source, f"{key}=true", "jaxlm's Llama has no biases")
  width, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
  head_dim = hf.get("head_dim") or (width // heads if heads else 0)
  if heads and head_dim * heads != width:
    raise _unsupported(source, f"head_dim={head_dim} with {heads} heads of a {width}-wide model",
                       "jaxlm's heads split the width evenly (head_dim = hidden_size / num_attention_heads)")
  kv = hf.get("num_key_value_heads") or heads
  if not isinstance(kv, int) or kv < 1 or heads % kv:
    raise UserError(f"{source}: num_key_value_heads={kv!r} does not divide num_attention_heads={heads}",
                    "the config.json does not describe a model transformers can build")
  return {"num_layers": hf.get("num_hidden_layers", 32), "num_heads": heads, "num_kv_heads": 0 if kv == heads else kv,
          "width": width, "mlp_width": hf.get("intermediate_size", 11008),
          "max_seq_len": hf.get("max_position_embeddings", 2048), "vocab_size": hf.get("vocab_size", 32000),
          "position": "rope", "rope_base": _rope_base(hf, source), "norm": "rmsnorm",
          "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "mlp": "swiglu",
          "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "use_bias": False}


def export_family(m) -> str:
  """The Hugging Face family a jaxlm decoder's ModelConfig `m` is exactly, or one error line naming why not."""
  gpt2 = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}
  llama = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
  for family, want in (("gpt2", gpt2), ("llama", llama)):
    if all(getattr(m, k) == v for k, v in want.items()):
      if family == "gpt2" and m.kv_heads != m.num_heads:
        raise UserError(f"the model has grouped-query attention (num_kv_heads={m.num_kv_heads}) with learned "
                        "positions and LayerNorm, which GPT-2 does not have", "train a Llama-shaped model "
                        "(model.position=rope, model.norm=rmsnorm, model.mlp=swiglu) to export GQA")
      return family
  have = ", ".join(f"model.{k}={getattr(m, k)}" for k in gpt2)
  raise UserError(f"the model ({have}) is neither GPT-2 (learned, layernorm, gelu) nor Llama (rope, rmsnorm, "
                  "swiglu) in Hugging Face's terms", "train with one of those two sets of model settings to export")


def hf_config(m, family: str, bos: int, eos: int) -> dict:
  """A config.json that transformers builds the same function from."""
  common = {"vocab_size": m.vocab_size, "tie_word_embeddings": m.tie_embeddings, "bos_token_id": bos,
            "eos_token_id": eos}
  if family == "gpt2":
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": m.num_layers,
            "n_head": m.num_heads, "n_embd": m.width, "n_inner": m.mlp_width, "n_positions": m.max_seq_len,
            "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps, "attn_pdrop": m.dropout,
            "embd_pdrop": m.dropout, "resid_pdrop": m.dropout, **common}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": m.num_layers,
          "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "hidden_size": m.width,
          "head_dim": m.width // m.num_heads, "intermediate_size": m.mlp_width,
          "max_position_embeddings": m.max_seq_len, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
          "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base}, "rope_theta": m.rope_base,
          "attention_bias": m.use_bias, "mlp_bias": m.use_bias, "attention_dropout": m.dropout, **common}
