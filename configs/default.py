"""The default job: a small GPT on the built-in fairy tales that visibly learns in ~2-3 CPU minutes."""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.data.path = ""  # built-in fairy tales
  c.data.batch_size = 16
  c.data.seq_len = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.width = 128
  c.model.mlp_width = 512
  c.model.max_seq_len = 128
  c.optim.lr = 2e-3
  c.optim.final_lr = 2e-4
  c.optim.warmup_steps = 50
  c.train.steps = 1000
  c.train.eval_every = 200
  c.train.checkpoint_every = 500
  c.train.sample_prompt = "Once upon a time"
  return c
