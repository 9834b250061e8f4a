"""GPT-2 small's shape (12 layers, 12 heads, width 768, context 1024, ~124M parameters), for accelerators.

Use with a prepared corpus and a mesh that fits the machine, e.g. on 8 chips:
  jaxlm train --config=configs/gpt2_124m.py --workdir=... --config.data.path=... --config.mesh.fsdp=-1
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.data.batch_size = 256
  c.data.seq_len = 1024
  c.model.num_layers = 12
  c.model.scan_layers = True  # (accelerators: compile time does not grow with depth)
  c.model.num_heads = 12
  c.model.width = 768
  c.model.mlp_width = 3072
  c.model.max_seq_len = 1024
  c.model.position = "learned"
  c.model.norm = "layernorm"
  c.model.use_bias = True
  c.model.dtype = "bfloat16"
  c.optim.lr = 6e-4
  c.optim.final_lr = 6e-5
  c.optim.warmup_steps = 700
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.train.steps = 20000
  c.train.eval_every = 1000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 1000
  c.train.sample_prompt = "The"
  return c
