"""Throughput in the log: tokens per second per device and MFU in metrics.jsonl and on the console, the
model's FLOPs at start-up; and train.profile_steps, a jax.profiler trace of a window of steps."""

import contextlib
import glob
import io
import json
import os
import re
import types

import fsspec
import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from test_cli_errors import assert_one_line_error, train

from jaxlm import hardware, loop
from jaxlm.flops import model_flops_per_token
from jaxlm.profiling import StepProfiler
from jaxlm.watchdog import Watchdog


def training_lines(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [m for m in map(json.loads, f) if "loss" in m]


def test_every_timed_training_line_has_mfu_and_tokens_per_sec_per_device(trained_run):
  lines = training_lines(trained_run.workdir)
  for m in lines:
    assert m["tokens_per_sec_per_device"] == pytest.approx(m["tokens_per_sec"] / jax.device_count())
  # Step 1 compiles: no step has been timed yet, so 0 tokens/s (as ever) and no MFU.
  assert lines[0]["tokens_per_sec"] == 0 and "mfu" not in lines[0]
  assert all(0 < m["mfu"] < 1 for m in lines[1:]), [m.get("mfu") for m in lines]


def test_the_console_line_shows_mfu(trained_run):
  shown = [line for line in trained_run.output.splitlines() if line.startswith("step ") and " tok/s" in line]
  assert len(shown) == 6 and all(re.search(r"tok/s  MFU +\d+\.\d%  ETA", line) for line in shown[1:])


def test_start_up_says_the_model_flops_and_the_peak(trained_run):
  config, result = trained_run.config, trained_run.result
  assert re.search(r"\nmodel: [\d.]+ kFLOPs per token \(6N \+ attention\); peak [\d.]+ [GT]FLOP/s per device "
                   r"\(the float32 matmul probe of this machine\)\n", trained_run.output), trained_run.output
  model_config = loop.model_for(config, loop.load_data(config.data).tokenizer)[0]
  assert result["model_flops_per_token"] == model_flops_per_token(model_config, "decoder", config.data.seq_len)


def test_an_unknown_device_has_no_peak_and_its_lines_no_mfu():
  gpu = types.SimpleNamespace(platform="gpu", device_kind="XYZ 9000")
  assert hardware.peak_flops_per_device(gpu) == (0.0, "unknown for 'XYZ 9000'")
  trainer = types.SimpleNamespace(config=tiny_config(), peak=0.0, model_flops=1e6)
  values = loop.Trainer.throughput(trainer, 0.01)
  assert values["tokens_per_sec"] == 8 * 16 / 0.01 and "mfu" not in values


def test_a_profiled_window_leaves_a_trace_that_names_the_train_step(tmp_path):
  config = tiny_config()
  config.mesh.data, config.train.steps, config.train.profile_steps = -1, 5, "2,4"
  config.train.eval_every = config.train.checkpoint_every = 5
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    loop.run(config, str(tmp_path))
  assert f"profile of steps 2 to 4 in {tmp_path / 'profile'} (view it: tensorboard" in out.getvalue()
  (trace,) = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  data = open(trace, "rb").read()
  assert b"jit_train_step" in data  # the device's work of the steps, by the jitted function's name
  assert [m["step"] for m in training_lines(tmp_path)] == [1, 2, 3, 4, 5]


def profile(window, workdir, steps):
  """StepProfiler over `steps` of a small jitted function, as the loop drives it; its messages."""
  said, step_fn, x = [], jax.jit(lambda x: jnp.sin(x) @ x), jnp.ones((64, 64))
  profiler, watchdog = StepProfiler(window, str(workdir), said.append), Watchdog(-1, False, 1)
  for step in steps:
    profiler.before(step)
    x = step_fn(x)
    profiler.after(step, x, watchdog)
  profiler.stop(watchdog)  # (the loop's finally)
  return said


def test_a_run_resumed_inside_the_window_profiles_what_remains(tmp_path):
  assert profile((2, 5), tmp_path, range(4, 8)) == [
      f"profile of steps 4 to 5 in {tmp_path / 'profile'} (view it: tensorboard --logdir={tmp_path / 'profile'}, "
      "or xprof)"]
  assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_a_run_resumed_past_the_window_profiles_nothing(tmp_path):
  assert profile((2, 3), tmp_path, range(4, 6)) == [] and not (tmp_path / "profile").exists()


def test_a_run_that_stops_inside_the_window_still_writes_the_trace(tmp_path):
  assert profile((2, 5), tmp_path, range(1, 4))[0].startswith("profile of steps 2 to 3 in ")


def test_a_bucket_workdir_gets_the_trace_copied_up(tmp_path, monkeypatch):
  monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # (where the local trace goes first)
  assert profile((1, 2), "memory://bucket/run", range(1, 4)) == [
      "profile of steps 1 to 2 in memory://bucket/run/profile (view it: tensorboard "
      "--logdir=memory://bucket/run/profile, or xprof)"]
  (trace,) = fsspec.filesystem("memory").glob("/bucket/run/profile/plugins/profile/*/*.xplane.pb")
  assert fsspec.filesystem("memory").size(trace) > 0
  assert os.listdir(tmp_path) == []  # the local copy is gone


@pytest.mark.parametrize("value, fragment", [
    ("2", "train.profile_steps is '2', not two step numbers START,STOP (give START,STOP with 1 <= START < "
     "STOP <= train.steps=3, e.g. --config.train.profile_steps=2,3)"),
    ("two,three", "train.profile_steps is 'two,three', not two step numbers"),
    ("1.5,3", "train.profile_steps is '1.5,3', not two step numbers"),
    ("0,2", "train.profile_steps starts at step 0; steps count from 1"),
    ("-1,2", "train.profile_steps starts at step -1"),
    ("3,2", "train.profile_steps 3,2: START 3 is not below STOP 2"),
    ("2,2", "train.profile_steps 2,2: START 2 is not below STOP 2"),
    ("2,4", "train.profile_steps 2,4 ends after the last step, train.steps=3"),
])
def test_a_bad_profile_window_is_one_line(capsys, tmp_path, value, fragment):
  assert_one_line_error(*train(capsys, tmp_path, f"--config.train.profile_steps={value}"), fragment)
