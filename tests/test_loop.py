"""The loop's contract with the workdir (DESIGN.md): config.json, metrics.jsonl, checkpoints, resume."""

import json
import shutil

import pytest

from jaxlm import loop


def read_metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.fixture
def finished_run(trained_run):
  """The shared finished 6-step run on all 8 test devices (conftest.py)."""
  return trained_run.config, trained_run.workdir, trained_run.result


def test_workdir_holds_the_resolved_config(finished_run):
  config, workdir, _ = finished_run
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["width"] == config.model.width and saved["train"]["steps"] == 6
  assert saved["mesh"]["data"] == -1


def test_metrics_lines_carry_the_contracted_keys(finished_run):
  _, workdir, result = finished_run
  lines = read_metrics(workdir)
  train = [m for m in lines if "loss" in m]
  evals = [m for m in lines if "val_loss" in m]
  assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
  for m in train:
    assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= m.keys()
  assert [m["step"] for m in evals] == [3, 6]
  for m in evals:
    assert m["val_ppl"] == pytest.approx(2.718281828 ** m["val_loss"], rel=1e-6)
    assert m["val_bpb"] == pytest.approx(m["val_loss"] / 0.693147181, rel=1e-6)  # one byte per token
  assert train[-1]["loss"] < train[0]["loss"]
  assert result["val_loss"] == evals[-1]["val_loss"]


def test_checkpoints_are_saved_at_the_interval_and_at_the_end(finished_run):
  _, workdir, _ = finished_run
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


def test_rerun_resumes_from_the_newest_checkpoint_and_repeats_the_same_losses(finished_run, tmp_path):
  config, workdir, _ = finished_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if the run had stopped after step 3
  original = read_metrics(workdir)
  with open(resumed / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(m) + "\n" for m in original if m["step"] <= 3)
  loop.run(config, str(resumed), quiet=True)
  again = read_metrics(resumed)
  losses = lambda ms: [(m["step"], m["loss"], m["grad_norm"]) for m in ms if "loss" in m]
  assert losses(again) == losses(original)  # bitwise: same params, optimizer state and batches
  assert again[-1]["val_loss"] == original[-1]["val_loss"]


def test_the_end_of_training_prints_a_sample_longer_than_the_positions(trained_run):
  sample = trained_run.output.split("sample:\n", 1)[1].split("\n\n", 1)[0]
  # 40 tokens were asked for after "Once" and 28 fit the 32 positions: the context slid for the rest.
  assert sample.startswith("Once") and len(sample.encode()) >= 4 + 40 - 1 and "positions" not in sample


def test_the_loops_val_loss_is_named_as_an_estimate(trained_run):
  lines = [line for line in trained_run.output.splitlines() if "val_loss" in line]
  assert len(lines) == 2 and all(line.endswith("(on 2 validation batches)") for line in lines)


def test_a_finished_run_says_so_and_does_nothing(trained_run, tmp_path, capsys):
  copy = tmp_path / "w"
  shutil.copytree(trained_run.workdir, copy)
  before = (copy / "metrics.jsonl").read_text()
  result = loop.run(trained_run.config, str(copy))
  out = capsys.readouterr().out
  assert result == {"finished_at": 6} and "sample:" not in out
  assert f"{copy} holds a finished run: step 6 of train.steps=6 (raise --config.train.steps to train on" in out
  assert (copy / "metrics.jsonl").read_text() == before
