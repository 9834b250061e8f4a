"""A small BERT: masked-LM pre-training of a bidirectional encoder on the built-in fairy tales, which
learns visibly in a few CPU minutes (validation masked-token accuracy far above always guessing the most
frequent character).

  jaxlm train --config=configs/bert_tiny.py --workdir=runs/bert
  jaxlm sample --workdir=runs/bert --prompt="Once upon a <mask><mask><mask><mask>, there lived a king."
"""

import os

from jaxlm.configfile import load_config_file


def get_config():
  # configs/default.py's model and CPU levers: the benchmark compares the two objectives step for step.
  c = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))
  c.objective = "mlm"
  c.data.batch_size = 32
  c.train.steps = 300
  c.train.eval_every = 100
  c.train.checkpoint_every = 150
  c.train.sample_tokens = 100  # the end sample fills the masks of this many validation tokens
  return c
