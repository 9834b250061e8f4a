"""One run per workdir: a second `jaxlm train` is refused in one line naming the holder, `sample` and
`eval` still read the workdir, a SIGKILLed holder leaves no stuck lock, and a start that fails leaves no
workdir behind."""

import contextlib
import io
import json
import os
import time

import pytest
from conftest import ROOT
from processes import spawn_jaxlm

from jaxlm import cli

TINY = f"--config={ROOT}/tests/tiny.py"


def capture(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(list(argv))
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def training(tmp_path_factory):
  """A `jaxlm train` process that goes on for long, once it has saved a checkpoint: (workdir, process)."""
  workdir = tmp_path_factory.mktemp("busy") / "w"
  logs = workdir.parent
  proc = spawn_jaxlm(["train", TINY, f"--workdir={workdir}", "--config.mesh.data=1", "--config.train.steps=1000000",
                      "--config.train.checkpoint_every=100", "--config.train.eval_every=100000",
                      "--config.train.log_every=50"], devices=1,
                     outputs=lambda i: (open(logs / "out", "w"), open(logs / "err", "w")))[0]  # noqa: SIM115
  deadline = time.monotonic() + 120
  while not any((workdir / "checkpoints" / n / "jaxlm-manifest.json").exists()
                for n in (os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").exists() else [])):
    assert proc.poll() is None and time.monotonic() < deadline, (logs / "err").read_text()[-2000:]
    time.sleep(0.1)
  yield workdir, proc
  proc.kill()
  proc.wait()


def test_a_second_train_on_a_busy_workdir_is_refused_naming_the_holder(training):
  workdir, proc = training
  config_before = (workdir / "config.json").read_text()
  code, out, err = capture("train", TINY, f"--workdir={workdir}", "--config.mesh.data=-1")
  lines = err.strip().splitlines()
  assert code == 2 and out == "" and len(lines) == 1, err
  assert lines[0].startswith(f"jaxlm: error: workdir {workdir} is in use by pid {proc.pid} on ")
  assert "give another --workdir" in lines[0]
  assert (workdir / "config.json").read_text() == config_before and proc.poll() is None


def test_sample_and_eval_read_a_workdir_being_trained(training):
  workdir, _ = training
  code, out, err = capture("sample", f"--workdir={workdir}", "--prompt=Once", "--max_new_tokens=5")
  assert code == 0 and out.startswith("Once"), err
  code, out, err = capture("eval", f"--workdir={workdir}", "--json")
  assert code == 0 and json.loads(out)["tokens"] > 0, err


def test_a_sigkilled_holder_leaves_no_stuck_lock(training):
  workdir, proc = training
  test_a_second_train_on_a_busy_workdir_is_refused_naming_the_holder(training)  # (held until now)
  proc.kill()
  proc.wait()
  code, out, err = capture("train", TINY, f"--workdir={workdir}", "--config.mesh.data=-1", "--config.train.steps=2")
  assert code == 0, err
  assert "holds a finished run" in out  # it took the lock, resumed, and found nothing left to do


@pytest.mark.parametrize("override", ["--config.data.path=/nonexistent/corpus.txt", "--config.model.vocab_size=7"])
def test_a_start_that_fails_leaves_no_workdir_behind(tmp_path, override):
  workdir = tmp_path / "new" / "run"
  code, _, err = capture("train", TINY, f"--workdir={workdir}", "--config.mesh.data=-1", override)
  assert code == 2 and err.startswith("jaxlm: error: ")
  assert not workdir.exists()
  workdir.mkdir(parents=True)  # a workdir that was there before stays
  assert capture("train", TINY, f"--workdir={workdir}", "--config.mesh.data=-1", override)[0] == 2
  assert workdir.is_dir() and os.listdir(workdir) == ["jaxlm.lock"]
