"""A small BERT: masked-LM pre-training of a bidirectional encoder on the built-in fairy tales, which
learns visibly in a few CPU minutes (validation masked-token accuracy far above always guessing the most
frequent character).

  jaxlm train --config=configs/bert_tiny.py --workdir=runs/bert
  jaxlm sample --workdir=runs/bert --prompt="Once upon a <mask><mask><mask><mask>, there lived a king."
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.objective = "mlm"
  c.data.path = ""  # built-in fairy tales
  c.data.batch_size = 32
  c.data.seq_len = 128
  # The default decoder's shape (configs/default.py): the benchmark compares the two step for step.
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.width = 128
  c.model.mlp_width = 512
  c.model.max_seq_len = 128
  c.optim.lr = 2e-3
  c.optim.final_lr = 2e-4
  c.optim.warmup_steps = 50
  c.train.steps = 600
  c.train.eval_every = 200
  c.train.checkpoint_every = 300
  c.train.sample_tokens = 100  # the end sample fills the masks of this many validation tokens
  c.model.dtype = "bfloat16"  # (CPU levers: see configs/default.py)
  c.mesh.cpu_devices = 2
  return c
