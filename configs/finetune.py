"""Fine-tuning a model you have (an import of Hugging Face weights, or any jaxlm run) on your own data.

It sets no model settings: they come from --config.init_from's run (jaxlm/init_from.py). The data must be in
that run's tokens, so prepare it with the run's tokenizer.json:

  jaxlm import --from=models/gpt2 --workdir=runs/gpt2
  jaxlm prepare --input=my_text/ --output=data/mine --tokenizer=runs/gpt2/tokenizer.json
  jaxlm train --config=configs/finetune.py --workdir=runs/gpt2-mine --config.init_from=runs/gpt2 \\
      --config.data.path=data/mine
  jaxlm export --workdir=runs/gpt2-mine --to=exported/gpt2-mine      (transformers loads it)

For (prompt, response) pairs, prepare with --pairs=prompt,response and add --config.data.sequences=packed.
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.data.seq_len = 256  # (at most the model's positions)
  c.data.batch_size = 8
  # A pre-trained model moves little and slowly: a tenth of a from-scratch learning rate, a short warmup.
  c.optim.lr = 1e-4
  c.optim.final_lr = 1e-5
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.train.steps = 200
  c.train.eval_every = 50
  c.train.checkpoint_every = 100
  c.train.sample_tokens = 64
  return c
