"""The tiny test model, as a function and as a config file (`jaxlm train --config=tests/tiny.py`).

It compiles in about a second, and its shapes divide every test mesh of 8 devices.
"""

from jaxlm.config import base_config


def tiny_config():
  c = base_config()
  c.data.batch_size = 8
  c.data.seq_len = 16
  c.data.fairytale_bytes = 100_000
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.width = 64
  c.model.mlp_width = 128
  c.model.max_seq_len = 32
  c.optim.warmup_steps = 2
  c.train.steps = 6
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.train.sample_tokens = 0
  c.mesh.data = 1
  return c


def get_config():
  return tiny_config()
