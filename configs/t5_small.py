"""T5-small's shape (6 encoder + 6 decoder blocks, width 512, 8 heads, MLP 2048, ~60M parameters with a
32k vocabulary), span-corruption pre-training with T5's recipe (inputs of 512 tokens from raw rows of 568,
targets of 114, noise 15% in spans of mean length 3), for accelerators.

Use with a prepared corpus (a BPE store: `jaxlm prepare --tokenizer=bpe:32000 ...`) and a mesh that fits:
  jaxlm train --config=configs/t5_small.py --workdir=... --config.data.path=... --config.mesh.fsdp=-1
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.objective = "span"
  c.data.batch_size = 128
  c.data.seq_len = 512
  c.data.sequences = "packed"  # (a store's documents end to end; set windows for a text file)
  c.model.num_layers = 6
  c.model.scan_layers = True  # (accelerators: compile time does not grow with depth)
  c.model.num_heads = 8
  c.model.width = 512
  c.model.mlp_width = 2048
  c.model.max_seq_len = 512
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"
  c.optim.lr = 1e-3
  c.optim.final_lr = 1e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.0
  c.train.steps = 100_000
  c.train.eval_every = 2000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 2000
  c.train.sample_prompt = "The <extra_id_0> of the <extra_id_1>."
  return c
