"""Checkpoints: damaged steps fall back with one warning, resharding restores, conflicts and init_from.

The kill/preemption equality tests, which need fresh processes, are in test_preemption.py.
"""

import glob
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from flax import nnx

from jaxlm import checkpoint, cli, loop
from jaxlm.checkpoint import Checkpoints, abstract_like, load_params
from jaxlm.manifest import MANIFEST
from jaxlm.data.text import TrainBatches
from jaxlm.errors import UserError
from jaxlm.models.transformer import ModelConfig
from jaxlm.parallel import batch_sharding, make_mesh, to_global_batch
from jaxlm.train import compile_steps, plan_train_state


@pytest.fixture
def trained(trained_run):
  """The shared finished 6-step run on 8 devices (conftest.py), checkpoints at steps 3 and 6."""
  return trained_run.config, trained_run.workdir


def restore_latest(config, workdir, mesh_shape=(8, 1, 1), devices=None):
  """Restores the newest valid step of `workdir` onto a mesh: (state, step, data step, setup, shardings)."""
  mesh = make_mesh(mesh_shape, devices)
  model_config = ModelConfig.from_config(config.model, 384)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(config.mesh.rules)):
    setup, init, shardings = plan_train_state(config, model_config, np.ones(384), mesh)
    data = TrainBatches(np.zeros(100, np.uint16), seq_len=16, batch_size=8, seed=config.seed)
    checkpoints = Checkpoints(str(workdir), keep=3)
    restored = checkpoints.restore_latest(abstract_like(jax.eval_shape(init), shardings), data)
    checkpoints.close()
  if restored is None:
    return None, None, data.step, setup, shardings
  return (*restored, data.step, setup, shardings)


def largest_array_file(step_dir):
  return max(glob.glob(f"{step_dir}/state/ocdbt.process_*/d/*"), key=os.path.getsize)


def truncate(path, size):
  os.truncate(path, size)


def change_bytes(path, old=None, new=None):
  """Changes a file's bytes in place, keeping its size: `old` -> `new`, or the middle 16 bytes inverted."""
  data = bytearray(open(path, "rb").read())
  if old is not None:
    assert len(old) == len(new) and old in data
    data = data.replace(old, new, 1)
  else:
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
  open(path, "wb").write(bytes(data))


DAMAGE = {
    "missing array file": lambda d: os.remove(largest_array_file(d)),
    "array file truncated to half": lambda d: truncate(largest_array_file(d),
                                                       os.path.getsize(largest_array_file(d)) // 2),
    "array file one byte short": lambda d: truncate(largest_array_file(d),
                                                    os.path.getsize(largest_array_file(d)) - 1),
    "missing step metadata": lambda d: os.remove(f"{d}/_CHECKPOINT_METADATA"),
    "missing tree metadata": lambda d: os.remove(f"{d}/state/_METADATA"),
    "missing array manifest": lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
    "missing data iterator state": lambda d: os.remove(glob.glob(f"{d}/data/process_*.json")[0]),
    "missing jaxlm manifest": lambda d: os.remove(f"{d}/{MANIFEST}"),
    "missing state folder": lambda d: shutil.rmtree(f"{d}/state"),
    # The same sizes, other bytes: orbax restored these silently (arrays) or failed to start (metrics).
    "array bytes changed": lambda d: change_bytes(largest_array_file(d)),
    "tree metadata bytes changed": lambda d: change_bytes(f"{d}/state/_METADATA"),
    "metrics file that does not decode": lambda d: change_bytes(f"{d}/metrics/metrics"),
    "data iterator state changed": lambda d: change_bytes(glob.glob(f"{d}/data/process_*.json")[0],
                                                          b'"step": 6', b'"step": 7'),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_step_falls_back_to_the_previous_with_one_warning(trained, tmp_path, capsys,
                                                                            kind):
  config, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  DAMAGE[kind](str(copy / "checkpoints" / "6"))
  capsys.readouterr()
  state, step, data_step, _, _ = restore_latest(config, copy)
  warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxlm:")]
  assert step == 3 and int(state.step) == 3 and data_step == 3
  assert len(warnings) == 1 and warnings[0].startswith("jaxlm: warning: checkpoint step 6 is damaged")
  # Set aside, not deleted: the step number is free for training to save again.
  assert sorted(os.listdir(copy / "checkpoints")) == ["3", "6.damaged"]
  reference, *_ = restore_latest(config, workdir)  # the undamaged copy restores step 6
  assert int(reference.step) == 6


def test_a_leftover_temporary_folder_is_reported_and_set_aside(trained, tmp_path, capsys):
  config, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  shutil.copytree(copy / "checkpoints" / "6", copy / "checkpoints" / "9.orbax-checkpoint-tmp-1234")
  capsys.readouterr()
  _, step, _, _, _ = restore_latest(config, copy)
  err = capsys.readouterr().err
  assert step == 6
  assert re.findall(r"jaxlm: warning: checkpoint step (\d+) was never completed", err) == ["9"]
  assert "9.incomplete" in os.listdir(copy / "checkpoints")


def test_a_step_folder_holding_another_step_is_not_trusted(trained, tmp_path, capsys):
  config, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  shutil.copytree(copy / "checkpoints" / "6", copy / "checkpoints" / "9")  # e.g. a bad manual copy
  capsys.readouterr()
  state, step, _, _, _ = restore_latest(config, copy)
  assert step == 6 and int(state.step) == 6
  assert "checkpoint step 9 is damaged: it holds the state of step 6" in capsys.readouterr().err


def test_every_step_damaged_starts_fresh(trained, tmp_path, capsys):
  config, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  for step in ("3", "6"):
    os.remove(copy / "checkpoints" / step / MANIFEST)
  state, step, _, _, _ = restore_latest(config, copy)
  assert state is None and step is None
  assert capsys.readouterr().err.count("jaxlm: warning: checkpoint step") == 2


def test_the_cli_resumes_past_a_damaged_step_without_a_traceback(trained, tmp_path, capsys):
  _, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  os.remove(largest_array_file(copy / "checkpoints" / "6"))
  capsys.readouterr()
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={copy}", "--config.mesh.data=-1"])
  out, err = capsys.readouterr()
  assert code == 0
  assert "Traceback" not in err and "Traceback" not in out
  assert [line for line in err.splitlines() if line.strip()] == [
      line for line in err.splitlines() if line.startswith("jaxlm: warning: checkpoint step 6 is damaged")]
  assert f"resumed from {copy}/checkpoints/3" in out
  original = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  again = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
  same = lambda ms: [(m["step"], m.get("loss"), m.get("val_loss")) for m in ms]
  assert same(again) == same(original)  # steps 4-6 retrained exactly, and logged once


def test_restore_reshards_onto_another_mesh_and_continues(trained):
  """Saved on (8,1,1); restored on (2,2,2) and on one device: equal arrays, equal next loss."""
  config, workdir = trained
  results = {}
  for name, shape, devices in (("8x1x1", (8, 1, 1), None), ("2x2x2", (2, 2, 2), None),
                               ("1 device", (1, 1, 1), jax.devices()[:1])):
    state, step, _, setup, shardings = restore_latest(config, workdir, shape, devices)
    assert step == 6
    mesh = make_mesh(shape, devices)
    assert jax.tree.leaves(state.params)[0].sharding.mesh.shape == mesh.shape
    arrays = [np.asarray(x) for x in jax.tree.leaves(state)]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(config.mesh.rules)):
      sharding = batch_sharding(mesh, tuple(config.mesh.rules))
      train, _ = compile_steps(setup, shardings, sharding)
      tokens = np.arange(5000, dtype=np.uint16) % 260
      data = TrainBatches(tokens, seq_len=16, batch_size=8, seed=0, step=6, transform=setup.objective.transform(
          None, 0, 0))
      _, metrics = train(state, to_global_batch(next(data), sharding))
      results[name] = arrays, float(metrics["loss"])
  saved, loss = results["8x1x1"]
  for name in ("2x2x2", "1 device"):
    arrays, other_loss = results[name]
    assert all(np.array_equal(a, b) for a, b in zip(saved, arrays)), name
    assert other_loss == pytest.approx(loss, rel=1e-5), name


def test_resume_with_shape_changing_config_is_a_clear_error(trained):
  _, workdir = trained
  changed = tiny_config()
  changed.mesh.data = -1
  changed.model.width = 128
  with pytest.raises(UserError, match=r"trained with model.width=64; this run asks for 128") as e:
    loop.run(changed, str(workdir), quiet=True)
  assert "new --workdir" in e.value.hint and "--config.model.width" in e.value.hint


def test_the_cli_reports_a_config_conflict_in_one_line(trained, capsys):
  _, workdir = trained
  capsys.readouterr()
  code = cli.main(["train", f"--config={ROOT}/tests/tiny.py", f"--workdir={workdir}",
                   "--config.mesh.data=-1", "--config.model.num_layers=3"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1
  assert err.startswith("jaxlm: error: ") and "model.num_layers=2" in err


def test_more_steps_and_another_mesh_may_change_on_resume(trained, tmp_path, capsys):
  config, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  longer = config.copy_and_resolve_references()
  longer.mesh.data, longer.mesh.tensor, longer.train.steps = 4, 2, 7
  capsys.readouterr()
  result = loop.run(longer, str(copy))
  out = capsys.readouterr().out
  assert "resuming with changed settings: mesh.data: -1 -> 4; mesh.tensor: 1 -> 2; train.steps: 6 -> 7" in out
  assert f"resumed from {copy}/checkpoints/6" in out
  steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
  assert steps[-2:] == [7, 7] and result["val_loss"] > 0  # step 7's training and evaluation lines


def test_init_from_loads_parameters_only_and_starts_at_step_zero(trained, tmp_path):
  config, workdir = trained
  saved, *_ = restore_latest(config, workdir)
  mesh = make_mesh((8, 1, 1))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(config.mesh.rules)):
    _, init, shardings = plan_train_state(config, ModelConfig.from_config(config.model, 384),
                                          np.ones(384), mesh)
    abstract = abstract_like(jax.eval_shape(init).params, shardings.params)
    for path in (workdir, workdir / "6", workdir / "checkpoints" / "6"):
      params, _ = load_params(str(path), abstract)
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved.params)))
    params, _ = load_params(str(workdir / "3"), abstract)
    assert not np.array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(saved.params)[0])

  tuned = tiny_config()
  tuned.mesh.data, tuned.train.steps, tuned.init_from = -1, 3, str(workdir)
  tuned.optim.lr = 1e-4
  result = loop.run(tuned, str(tmp_path / "tuned"), quiet=True)
  lines = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
  assert lines[0]["step"] == 1
  original = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # Starting from the trained parameters, the first loss is already near where that run ended.
  assert lines[0]["loss"] < original[0]["loss"] - 0.3 and result["val_loss"] > 0


def test_init_from_a_differently_shaped_model_names_the_setting_and_both_values(trained, tmp_path):
  _, workdir = trained
  other = tiny_config()
  other.mesh.data, other.init_from = -1, str(workdir)
  other.model.mlp_width = 256
  with pytest.raises(UserError) as e:
    loop.run(other, str(tmp_path / "other"), quiet=True)
  assert "holds another model: model.mlp_width=128 there, 256 here" in e.value.what, e.value


def test_init_from_a_bare_checkpoint_folder_names_the_parameter_and_both_shapes(trained, tmp_path):
  """Without the source's config.json only the shapes can be checked: the restore names the parameter."""
  _, workdir = trained
  bare = tmp_path / "bare"
  shutil.copytree(workdir / "checkpoints", bare / "checkpoints")
  other = tiny_config()
  other.mesh.data, other.init_from = -1, str(bare)
  other.model.mlp_width = 256
  with pytest.raises(UserError) as e:
    loop.run(other, str(tmp_path / "other"), quiet=True)
  assert "params/blocks/0/mlp/down has shape (128, 64) there, (256, 64) here" in e.value.what, e.value


@pytest.mark.parametrize("path, message", [("nowhere", "no checkpoints in"), ("{w}/99", "no checkpoint for step 99")])
def test_init_from_a_bad_path_is_a_clear_error(trained, tmp_path, path, message):
  _, workdir = trained
  config = tiny_config()
  config.mesh.data, config.init_from = -1, path.format(w=workdir)
  with pytest.raises(UserError, match=message):
    loop.run(config, str(tmp_path / "x"), quiet=True)


def test_the_workdir_alone_holds_config_tokenizer_and_checkpoints(trained):
  _, workdir = trained
  assert json.loads((workdir / "tokenizer.json").read_text()) == {"type": "byte", "vocab_size": 260}
  assert json.loads((workdir / "config.json").read_text())["model"]["width"] == 64
  for step in ("3", "6"):
    step_dir = workdir / "checkpoints" / step
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["step"] == int(step) and any(n.startswith("state/") for n in manifest["files"])
    assert json.loads((step_dir / "data" / "process_0-of-1.json").read_text())["step"] == int(step)


def test_nothing_loads_pickle():
  """No pickle from disk: no module of the package can unpickle."""
  pattern = re.compile(r"\bpickle\b|cloudpickle|\bdill\b|allow_pickle\s*=\s*True|torch\.load|joblib")
  offenders = []
  for path in glob.glob(f"{ROOT}/jaxlm/**/*.py", recursive=True):
    with open(path) as f:
      source = f.read().splitlines()
    for number, line in enumerate(source, 1):
      if pattern.search(line):
        offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
  assert not offenders, offenders


def test_keeps_the_newest_k_and_the_best_by_validation_loss(tmp_path):
  state = {"w": np.arange(4.0)}
  data = TrainBatches(np.zeros(100, np.uint16), seq_len=16, batch_size=8, seed=0)
  checkpoints = Checkpoints(str(tmp_path), keep=2)
  for step, val_loss in ((1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, 2.5), (6, None)):
    checkpoints.save(step, state, data, val_loss=val_loss)
    checkpoints.wait()
  assert checkpoints.steps() == [2, 5, 6]  # the newest two, and step 2 with the lowest val_loss
  assert checkpoints.save(6, state, data) is False  # an existing step is left as it is
  checkpoints.close()
  reopened = Checkpoints(str(tmp_path), keep=2)  # the ranking survives a restart
  reopened.save(7, state, data, val_loss=2.2)
  reopened.close()
  assert reopened.steps() == [2, 6, 7]


def flaky_restore(monkeypatch, error, failures):
  """Checkpoints._restore raises `error()` the first `failures` times (all times: None), then reads."""
  real, calls = Checkpoints._restore, []

  def restore(self, *args):
    calls.append(1)
    if failures is None or len(calls) <= failures:
      raise error()
    return real(self, *args)
  monkeypatch.setattr(Checkpoints, "_restore", restore)
  monkeypatch.setattr(checkpoint, "RETRY_SECONDS", 0.0)
  return calls


def unavailable():
  return ValueError("UNAVAILABLE: Failed to read from gs://bucket/w/checkpoints/6 [curl_code='7']")


def test_a_transient_read_error_is_retried_and_moves_nothing(trained, tmp_path, capsys, monkeypatch):
  config, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  calls = flaky_restore(monkeypatch, unavailable, failures=2)
  capsys.readouterr()
  state, step, *_ = restore_latest(config, copy)
  assert step == 6 and int(state.step) == 6 and len(calls) == 3
  assert capsys.readouterr().err.count("jaxlm: warning: reading checkpoint step 6 failed (UNAVAILABLE") == 2
  assert sorted(os.listdir(copy / "checkpoints")) == ["3", "6"]


def out_of_memory():
  try:
    raise MemoryError("Unable to allocate 64.0 GiB")
  except MemoryError as e:  # how orbax wraps a failed array read
    raise Exception("Encountered error while reading array index: (slice(0, 256, 1),)") from e


@pytest.mark.parametrize("error, kind", [(out_of_memory, Exception), (lambda: RuntimeError("a bug of ours"), RuntimeError),
                                         (unavailable, ValueError)])
def test_other_read_errors_raise_as_they_are_and_move_nothing(trained, tmp_path, monkeypatch, error, kind):
  config, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  flaky_restore(monkeypatch, error, failures=None)  # (UNAVAILABLE every time: retried, then raised)
  with pytest.raises(kind) as raised:
    restore_latest(config, copy)
  assert type(raised.value) is kind
  assert sorted(os.listdir(copy / "checkpoints")) == ["3", "6"]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_say_when_they_skip_a_damaged_newest_step(trained, tmp_path, capsys, command):
  _, workdir = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  os.remove(copy / "checkpoints" / "6" / MANIFEST)
  capsys.readouterr()
  args = ["--max_new_tokens=3", "--prompt=Once"] if command == "sample" else []
  code = cli.main([command, f"--workdir={copy}", *args])
  err = capsys.readouterr().err
  assert code == 0 and err.splitlines() == [
      f"jaxlm: warning: skipping damaged checkpoint step 6 ({MANIFEST} is missing (the save did not finish)); "
      "using step 3"]


def test_a_step_rotated_away_while_resolving_is_listed_again(tmp_path, monkeypatch):
  """A workdir being trained deletes its old steps as it saves new ones: `jaxlm sample` then finds the
  new one instead of calling the workdir empty."""
  import shutil

  from jaxlm import checkpoint

  directory = tmp_path / "checkpoints"
  for step in (1, 2):
    (directory / str(step)).mkdir(parents=True)

  def problem(path):
    step = int(os.path.basename(path))
    if step == 3:
      return None
    shutil.rmtree(path)  # (the run rotates 1 and 2 away and has sealed 3 meanwhile)
    (directory / "3").mkdir(exist_ok=True)
    return "no manifest"

  monkeypatch.setattr(checkpoint, "step_problem", problem)
  assert checkpoint.resolve_checkpoint(str(tmp_path), quiet=True) == (str(directory), 3)
