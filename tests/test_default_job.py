"""The default job, exactly as the README runs it (a fresh process, the shipped config), learns."""

import collections
import json
import math
import os
import subprocess
import sys

from conftest import ROOT
from jaxlm.data.fairytales import generate_fairy_tales


def unigram_entropy_nats(data: bytes) -> float:
  counts = collections.Counter(data)
  return -sum(n / len(data) * math.log(n / len(data)) for n in counts.values())


def test_default_job_falls_well_below_the_corpus_unigram_entropy(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the user's device setup
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.cli", "train", f"--config={ROOT}/configs/default.py",
       f"--workdir={tmp_path}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sample:\nOnce upon a time" in result.stdout
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [m for m in lines if "val_loss" in m]
  text = generate_fairy_tales(4_000_000, seed=0).encode()
  entropy = unigram_entropy_nats(text[int(len(text) * 0.9):])  # of the validation split, ~3 nats
  assert [m["val_loss"] for m in evals] == sorted((m["val_loss"] for m in evals), reverse=True)
  assert evals[-1]["val_loss"] < 0.5 * entropy, (evals[-1]["val_loss"], entropy)
