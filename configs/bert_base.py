"""BERT-base's shape (12 layers, 12 heads, width 768, MLP 3072, 512 positions, ~110M parameters with a
30k vocabulary), masked-LM pre-training for accelerators, with BERT's phase-1 sequence length 128.

Prepare a corpus with a ~30k BPE first, then e.g. on 8 chips:
  jaxlm prepare --input=corpus/ --output=data/corpus --tokenizer=bpe:30522
  jaxlm train --config=configs/bert_base.py --workdir=... --config.data.path=data/corpus --config.mesh.fsdp=-1
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.objective = "mlm"
  c.data.sequences = "packed"  # whole documents, each attending only to itself
  c.data.batch_size = 256
  c.data.seq_len = 128
  c.model.num_layers = 12
  c.model.scan_layers = True  # (accelerators: compile time does not grow with depth)
  c.model.num_heads = 12
  c.model.width = 768
  c.model.mlp_width = 3072
  c.model.max_seq_len = 512
  c.model.position = "learned"
  c.model.norm = "layernorm"
  c.model.use_bias = True
  c.model.dtype = "bfloat16"
  c.optim.lr = 1e-4
  c.optim.final_lr = 0.0
  c.optim.warmup_steps = 10_000
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01
  c.train.steps = 1_000_000
  c.train.eval_every = 10_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 10_000
  c.train.sample_prompt = "The capital of France is <mask>."
  return c
