"""configs/shakespeare_char.py reaches the reference trainer's validation loss (1.8857 at 2000 steps)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHAKESPEARE


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE),
                    reason="../shared/data/tinyshakespeare.txt is only on developer and CI machines")
def test_shakespeare_char_reaches_the_reference_validation_loss(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the shipped device setup
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.cli", "train", f"--config={ROOT}/configs/shakespeare_char.py",
       f"--workdir={tmp_path}", f"--config.data.path={SHAKESPEARE}", "--config.train.sample_tokens=0"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  final = [m for m in lines if "val_loss" in m and m["step"] == 2000]
  assert len(final) == 1 and final[0]["val_loss"] <= 1.88, final
