"""Tiny Hugging Face checkpoints made here by `transformers` (random weights, no download): a GPT-2 and a Llama
with grouped-query attention, each with a byte-level BPE tokenizer.json trained on the built-in fairy tales.

Every tensor is drawn at random (norm scales around 1), not left at transformers' init, whose zero biases and
unit norm scales would hide a bias or norm mapped to the wrong place.
"""

import os

from jaxlm.data.fairytales import generate_fairy_tales

TEXT_BYTES = 60_000
POSITIONS = 512


def fairy_text() -> str:
  return generate_fairy_tales(TEXT_BYTES, seed=3)


def tokenizer(special: list[str], vocab_size: int = 320):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  t.train_from_iterator([fairy_text()], trainer)
  return t


def randomise(model, seed: int) -> None:
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      centre = 1.0 if name.endswith("weight") and ("ln" in name or "norm" in name) else 0.0
      p.copy_(centre + 0.1 * torch.randn(p.shape, generator=generator))


def make_gpt2(folder: str, dtype=None) -> str:
  from transformers import GPT2Config, GPT2LMHeadModel

  tok = tokenizer(["<|endoftext|>"])
  end = tok.token_to_id("<|endoftext|>")
  config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=POSITIONS, vocab_size=tok.get_vocab_size(),
                      bos_token_id=end, eos_token_id=end)
  return _save(GPT2LMHeadModel(config), tok, folder, dtype, seed=1)


def make_llama(folder: str, dtype=None) -> str:
  from transformers import LlamaConfig, LlamaForCausalLM

  tok = tokenizer(["<unk>", "<s>", "</s>"])
  config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=tok.get_vocab_size(), max_position_embeddings=POSITIONS,
                       rms_norm_eps=1e-5, rope_theta=5000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  return _save(LlamaForCausalLM(config), tok, folder, dtype, seed=2)


def _save(model, tok, folder: str, dtype, seed: int) -> str:
  randomise(model, seed)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(folder)
  tok.save(os.path.join(folder, "tokenizer.json"))
  return folder
