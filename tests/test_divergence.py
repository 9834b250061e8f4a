"""A diverging run stops at the step its loss or gradient goes non-finite (exit 3, one line), saves
nothing non-finite, keeps every finite checkpoint, and leaves metrics.jsonl strict JSON."""

import contextlib
import io
import json
import math
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT
from test_tensorboard import event_scalars, jsonl_scalars

from jaxlm import checkpoint, cli
from jaxlm.checkpoint import Checkpoints, abstract_like, load_params
from jaxlm.data.text import TrainBatches
from jaxlm.errors import RunFailed, UserError

# lr=1e2 takes the tiny model's gradient norm to NaN at step 13 (measured; 1e4 already at step 5), after
# checkpoints at 3, 6, 9 and 12. The warmup of 50 is longer than the 40-step run: shortened, with a note.
TRAIN = ["train", f"--config={ROOT}/tests/tiny.py", "--config.mesh.data=-1", "--config.optim.lr=1e2",
         "--config.train.steps=40", "--config.train.log_every=5", "--config.optim.warmup_steps=50"]


def capture(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(list(argv))
  return code, out.getvalue(), err.getvalue()


def saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
  """The diverging command, run twice on one workdir: (workdir, first run, second run, steps after the first)."""
  workdir = tmp_path_factory.mktemp("diverged") / "w"
  first = capture(*TRAIN, f"--workdir={workdir}")
  steps = saved_steps(workdir)
  second = capture(*TRAIN, f"--workdir={workdir}")
  return workdir, first, second, steps


def diverged_step(err):
  lines = [line for line in err.splitlines() if line.startswith("jaxlm:")]
  assert len(lines) == 1 and lines[0].startswith("jaxlm: error: training diverged at step "), err
  return int(lines[0].split("at step ")[1].split(":")[0]), lines[0]


def test_the_run_stops_at_the_first_non_finite_step_with_one_line_and_exit_3(diverged):
  _, (code, out, err), _, steps = diverged
  step, line = diverged_step(err)
  assert code == 3 and "Traceback" not in err
  assert "lower --config.optim.lr (now 100)" in line
  assert f"rerunning resumes from the checkpoint of step {steps[-1]}" in line
  assert "note: optim.warmup_steps 50 is not below train.steps 40: warming up over 4 steps instead" in out
  assert steps and steps[-1] < step <= steps[-1] + 3  # it stopped at once: no later checkpoint


def test_metrics_stay_strict_json_and_end_at_the_diverged_step(diverged):
  workdir, (_, _, err), _, _ = diverged
  step, _ = diverged_step(err)

  def no_nan(constant):
    raise AssertionError(f"{constant} is not JSON")
  lines = [json.loads(line, parse_constant=no_nan) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["step"] == step and max(m["step"] for m in lines) == step
  assert None in (lines[-1].get("loss"), lines[-1].get("grad_norm"))  # non-finite is written as null
  assert all(v is None or math.isfinite(v) for m in lines for v in m.values())
  # TensorBoard holds the same, the non-finite value of the diverged step included (both runs diverged)
  events = event_scalars(workdir / "tensorboard")
  assert events == jsonl_scalars(lines) and None in (events["loss"][-1][1], events["grad_norm"][-1][1])


def test_every_saved_step_is_finite_and_a_rerun_deletes_none_of_them(diverged):
  workdir, (_, _, err1), (code, out, err2), steps = diverged
  assert code == 3 and diverged_step(err2)[0] == diverged_step(err1)[0]  # the same step: resumed exactly
  assert f"resumed from {workdir}/checkpoints/{steps[-1]}" in out
  assert saved_steps(workdir) == steps
  for step in steps:
    with ocp.PyTreeCheckpointer() as checkpointer:
      directory = workdir / "checkpoints" / str(step) / "state"
      tree = checkpointer.metadata(directory).item_metadata.tree
      restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored) if x.dtype.kind == "f"), step


def test_sample_and_eval_of_the_diverged_workdir_use_its_last_finite_step(diverged):
  import jaxlm

  workdir, _, _, steps = diverged
  run = jaxlm.load(str(workdir))
  assert run.step == steps[-1] and checkpoint.all_finite(run.params)
  code, out, err = capture("eval", f"--workdir={workdir}", "--json")
  assert code == 0 and json.loads(out)["step"] == steps[-1] and math.isfinite(json.loads(out)["loss"]), err


def test_non_finite_logits_are_an_error_not_text(trained_run):
  import jaxlm

  run = jaxlm.load(str(trained_run.workdir))
  run._generator.params = jax.tree.map(lambda x: x * np.nan, run.params)
  with pytest.raises(UserError, match="the model's logits are not finite"):
    run.generate("Once", max_new_tokens=4, temperature=0)


def data():
  return TrainBatches(np.zeros(100, np.uint16), seq_len=16, batch_size=8, seed=0)


def test_a_non_finite_state_is_never_saved(tmp_path):
  checkpoints = Checkpoints(str(tmp_path), keep=2)
  checkpoints.save(1, {"w": np.ones(4, np.float32)}, data())
  with pytest.raises(RunFailed, match="the state of step 2 holds non-finite values; it was not saved"):
    checkpoints.save(2, {"w": np.array([1.0, np.nan], np.float32)}, data())
  checkpoints.close()
  assert checkpoints.steps() == [1]


def test_a_non_finite_validation_loss_never_ranks_as_the_best(tmp_path):
  state = {"w": np.arange(4.0)}
  checkpoints = Checkpoints(str(tmp_path), keep=2)
  for step, val_loss in ((1, 2.0), (2, math.nan), (3, math.nan), (4, math.inf), (5, math.nan)):
    checkpoints.save(step, state, data(), val_loss=val_loss)
    checkpoints.wait()
  checkpoints.close()
  assert checkpoints.steps() == [1, 4, 5]  # the newest two, and step 1: the only finite val_loss


def test_a_non_finite_checkpoint_from_an_older_jaxlm_is_set_aside_and_never_loaded(trained_run, tmp_path,
                                                                                  monkeypatch, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(trained_run.workdir, workdir)
  from test_checkpoint import restore_latest

  state, _, _, _, shardings = restore_latest(trained_run.config, workdir)  # step 6
  poisoned = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype) if x.dtype.kind == "f" else np.asarray(x),
                          state)
  poisoned = poisoned.replace(step=np.int32(9))
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "all_finite", lambda tree: True)  # what jaxlm did before it checked
    old = Checkpoints(str(workdir), keep=5)
    old.save(9, poisoned, data())
    old.close()
  with pytest.raises(UserError, match="holds non-finite parameters"):
    load_params(str(workdir / "9"), abstract_like(state.params, shardings.params))
  capsys.readouterr()
  _, step, *_ = restore_latest(trained_run.config, workdir)
  assert step == 6
  assert "checkpoint step 9 holds non-finite values" in capsys.readouterr().err
  assert "9.nonfinite" in os.listdir(workdir / "checkpoints")
