"""Model FLOPs per trained token, counted from the model's shapes (PaLM's accounting, appendix B):
6 x the parameters every token multiplies by (forward 2, backward 4), plus attention's score and value
products, 12 x layers x keys x width. Embedding lookups count nothing; the output projection counts in
full (tied or not); causal attention counts every key (PaLM's and nanoGPT's convention), although from
2 x 128 positions on jaxlm's einsum attention computes only the keys up to each block of 128 queries
(layers.attend: 3/4 of the products at 256 positions, so there the count is 2.5% above the work done on a
6-layer, width-384 model; at 1024 positions, 56% of them). Elementwise work
(norms, softmax, activations) is left out, so XLA's own count of the compiled step is a little higher
(metrics.flops_per_token; tests/test_flops.py compares the two).
"""

from jaxlm.models.transformer import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
  """Query, key, value and output projections of one self-attention (grouped-query: fewer key/value heads)."""
  head_dim = cfg.width // cfg.num_heads
  kv_heads = cfg.num_kv_heads or cfg.num_heads
  return cfg.width * head_dim * (2 * cfg.num_heads + 2 * kv_heads)


def mlp_params(cfg: ModelConfig) -> int:
  return cfg.width * cfg.mlp_width * (3 if cfg.mlp == "swiglu" else 2)


def model_flops_per_token(cfg: ModelConfig, family: str, input_len: int, target_len: int = 0) -> float:
  """Training FLOPs (forward and backward) per input token of a row of `input_len` tokens; an
  encoder-decoder's decoder adds its `target_len` positions per row (counted per input token)."""
  d, layers = cfg.width, cfg.num_layers
  block = attention_params(cfg) + mlp_params(cfg)
  head = d * cfg.vocab_size
  if family != "encoder-decoder":
    return 6.0 * (layers * block + head) + 12.0 * layers * input_len * d
  # Encoder positions: blocks and self-attention over the input; the decoder's cross-attention keys
  # and values are projections of every encoder position.
  # (Cross-attention keeps every head: grouped-query attention is the self-attention's.)
  cross_q_out, cross_kv = 2 * d * d, 2 * d * d
  encoder = 6.0 * layers * (block + cross_kv) + 12.0 * layers * input_len * d
  # Decoder positions: blocks, cross-attention's query and output, the head; attention over its own
  # positions and over the input.
  decoder = 6.0 * (layers * (block + cross_q_out) + head) + 12.0 * layers * (target_len + input_len) * d
  return encoder + decoder * target_len / input_len


def params_count(cfg: ModelConfig, family: str) -> tuple[int, int]:
  """(total, non-embedding: neither the embeddings nor an untied output layer) parameters from the shapes: `plan` and the tests compare it with the model's."""
  d, layers = cfg.width, cfg.num_layers
  norms = (2 if cfg.norm == "layernorm" else 1) * d
  bias = cfg.use_bias
  head_dim = d // cfg.num_heads
  kv_heads = cfg.num_kv_heads or cfg.num_heads
  attn = attention_params(cfg) + (head_dim * (cfg.num_heads + 2 * kv_heads) + d if bias else 0)
  mlp = mlp_params(cfg) + (cfg.mlp_width + d if bias else 0)
  block = attn + mlp + 2 * norms
  embedding = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0)
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  if family == "encoder-decoder":
    cross = 4 * d * d + (4 * d if bias else 0)
    body = layers * block + norms + layers * (block + cross + norms) + norms
  else:
    body = layers * block + norms
  return body + embedding + head, body
