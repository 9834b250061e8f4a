"""A small T5: span-corruption pre-training of an encoder-decoder on the built-in fairy tales, which learns
visibly in a few CPU minutes (the span loss falls far below its start; the end sample restores the spans
hidden from a validation stretch).

  jaxlm train --config=configs/t5_tiny.py --workdir=runs/t5
  jaxlm sample --workdir=runs/t5 --prompt="Once upon a <extra_id_0>, there lived a <extra_id_1>."
  jaxlm train --config=configs/t5_tiny.py --workdir=runs/t5_pairs --config.objective=seq2seq \\
      --config.data.path=data/pairs --config.init_from=runs/t5      (fine-tuning on pairs: README)
"""

import os

from jaxlm.configfile import load_config_file


def get_config():
  # configs/default.py's shape for the encoder and for the decoder (4 + 4 blocks of width 128), and its
  # CPU levers (bf16, 2 devices).
  c = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))
  c.objective = "span"
  c.data.seq_len = 128  # encoder inputs; raw rows of 141 tokens, targets of 29 (data.target_len, computed)
  c.data.batch_size = 16
  # The span loss falls from ~5.1 to ~2.2 (the targets' structure and character frequencies) in the first
  # few hundred steps, then slowly: using the input's context takes far longer (README, objectives).
  c.train.steps = 400
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.sample_tokens = 32
  c.train.sample_prompt = "Once upon a <extra_id_0>, there lived a <extra_id_1>."
  return c
