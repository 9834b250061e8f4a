"""Supervised fine-tuning of the default decoder on (prompt, response) pairs: the loss counts the response
tokens and their EOS only. The store and, usually, the pre-trained run are given on the command line:

  jaxlm prepare --input=pairs.jsonl --pairs=prompt,response --output=data/pairs
  jaxlm train --config=configs/sft_tiny.py --workdir=runs/sft --config.data.path=data/pairs \\
      --config.init_from=runs/default
  jaxlm sample --workdir=runs/sft --prompt="..."      (answers, and stops at EOS)
"""

import os

from jaxlm.configfile import load_config_file


def get_config():
  # configs/default.py's model, so --config.init_from=runs/default fits
  c = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))
  c.data.sequences = "packed"  # each example alone in its segment, its weights with it
  c.optim.lr = 1e-3
  c.optim.final_lr = 1e-4
  c.optim.warmup_steps = 20
  c.train.steps = 300
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.sample_tokens = 64
  return c
