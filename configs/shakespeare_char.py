"""The reference character-level setting (../shared/data/README.md), with the byte tokenizer.

4 layers, 4 heads, width 128, context 64, batch 12, AdamW lr 1e-3 cosine to 1e-4 over 2000 steps with
100 warmup steps, beta2 0.99, weight decay 0.1, clip 1.0, no dropout; validation = the last 10%.
The data path comes from the command line: --config.data.path=.../tinyshakespeare.txt
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.data.path = ""  # set on the command line
  c.data.batch_size = 12
  c.data.seq_len = 64
  c.data.val_fraction = 0.1
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.width = 128
  c.model.mlp_width = 512
  c.model.max_seq_len = 64
  c.model.dropout = 0.0
  c.optim.lr = 1e-3
  c.optim.final_lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.train.steps = 2000
  c.train.eval_every = 250
  c.train.eval_batches = 200
  c.train.checkpoint_every = 1000
  # CPU levers (benchmarks/train_throughput.py): two JAX devices keep both cores busy; bf16 matmuls
  # run on the CPU's bf16 units. Measured on shakespeare: val_loss at 2000 steps 1.7776 (bf16) vs
  # 1.7779 (float32), at 19.6 vs 38.5 ms per step. Set mesh.cpu_devices=0 to use JAX's default.
  c.model.dtype = "bfloat16"
  c.mesh.cpu_devices = 2
  return c
