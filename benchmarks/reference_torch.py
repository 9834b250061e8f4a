"""The PyTorch reference for CPU speed: the character-level GPT trainer of ../shared/data/README.md
(pre-norm GPT with learned positions, LayerNorm, GELU, tied embeddings, no bias in the reference
config's spirit kept simple: biases on; AdamW with warmup + cosine, clipping), written plainly in the
way a PyTorch user trains on a CPU. It prints one JSON line: the median tokens/s over the timed steps.

  python benchmarks/reference_torch.py --layers=4 --width=128 --heads=4 --seq_len=64 --batch=12 --steps=200

Needs torch (not a jaxlm dependency); benchmarks/cpu_speed.py runs it beside `jaxlm train`.
"""

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt")


class Block(nn.Module):
  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
    self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
    self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
  def __init__(self, vocab: int, layers: int, width: int, heads: int, seq_len: int):
    super().__init__()
    self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
    self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
    self.norm = nn.LayerNorm(width)
    for p in self.parameters():
      if p.dim() >= 2:
        nn.init.normal_(p, std=0.02)

  def forward(self, idx, targets):
    x = self.embed(idx) + self.pos(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.norm(x) @ self.embed.weight.T  # tied
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def lr_at(step: int, steps: int, lr=1e-3, final=1e-4, warmup=100) -> float:
  if step < warmup:
    return lr * (step + 1) / warmup
  progress = (step - warmup) / max(1, steps - warmup)
  return final + 0.5 * (lr - final) * (1 + math.cos(math.pi * progress))


def main() -> None:
  p = argparse.ArgumentParser()
  for name, default in (("layers", 4), ("width", 128), ("heads", 4), ("seq_len", 64), ("batch", 12), ("steps", 200)):
    p.add_argument(f"--{name}", type=int, default=default)
  a = p.parse_args()
  text = open(DATA).read()
  chars = sorted(set(text))
  data = torch.tensor([chars.index(c) for c in text[:200_000]], dtype=torch.long)
  torch.manual_seed(0)
  model = GPT(len(chars), a.layers, a.width, a.heads, a.seq_len)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  rest = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                          lr=1e-3, betas=(0.9, 0.99))
  times = []
  for step in range(a.steps):
    start = time.perf_counter()
    ix = torch.randint(len(data) - a.seq_len - 1, (a.batch,))
    x = torch.stack([data[i:i + a.seq_len] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + a.seq_len] for i in ix])
    for group in opt.param_groups:
      group["lr"] = lr_at(step, a.steps)
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    times.append(time.perf_counter() - start)
  sec = statistics.median(times[10:])
  print(json.dumps({"tokens_per_sec": a.batch * a.seq_len / sec, "step_ms": sec * 1e3, "loss": loss.item(),
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
