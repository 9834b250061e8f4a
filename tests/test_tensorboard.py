"""WORKDIR/tensorboard/ holds what metrics.jsonl holds: read back with TensorBoard's own reader, the scalars
of every key equal the file's lines (each step once, float32 of the same value), also after a resume from
a checkpoint older than the last logged step; and a real `tensorboard --logdir` serves them."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import fsspec
import numpy as np
import pytest

from jaxlm import loop
from jaxlm.metrics import MetricsLog


def event_scalars(folder) -> dict[str, list]:
  """{tag: [(step, value)]} as TensorBoard's Python reader shows the folder (purges applied, nothing
  sampled away; a tag whose points were all purged is left out); a non-finite value reads as None."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})
  reader.Reload()
  return {tag: [(e.step, e.value if math.isfinite(e.value) else None) for e in reader.Scalars(tag)]
          for tag in reader.Tags()["scalars"] if reader.Scalars(tag)}


def jsonl_scalars(rows) -> dict[str, list]:
  """The same view of metrics.jsonl's rows: TensorBoard keeps float32; null stands for a non-finite value."""
  out = {}
  for row in rows:
    for key, value in row.items():
      if key != "step":
        out.setdefault(key, []).append((row["step"], None if value is None else float(np.float32(value))))
  return out


def read_rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_runs_event_file_equals_its_metrics_jsonl(trained_run):
  workdir = trained_run.workdir
  events = event_scalars(workdir / "tensorboard")
  assert events == jsonl_scalars(read_rows(workdir))
  assert [step for step, _ in events["loss"]] == [1, 2, 3, 4, 5, 6]
  assert [step for step, _ in events["val_loss"]] == [3, 6]


@pytest.fixture(scope="module")
def resumed(trained_run, tmp_path_factory):
  """The shared 6-step run as if it had been killed after logging step 6 but before its checkpoint of
  step 6 was kept: the rerun restores step 3 and logs steps 4 to 6 again (with other tokens_per_sec)."""
  workdir = tmp_path_factory.mktemp("tb-resumed") / "w"
  shutil.copytree(trained_run.workdir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  loop.run(trained_run.config, str(workdir), quiet=True)
  return workdir


def test_a_resumed_run_shows_each_step_once_with_the_values_of_metrics_jsonl(trained_run, resumed):
  first, _ = sorted(os.listdir(resumed / "tensorboard"))  # the killed run's file (rewritten) and the rerun's
  assert os.listdir(trained_run.workdir / "tensorboard") == [first]
  # (the killed run's file held steps 4-6 too: the resume is what drops them)
  assert [s for s, _ in event_scalars(trained_run.workdir / "tensorboard")["tokens_per_sec"]] == [1, 2, 3, 4, 5, 6]
  rows = read_rows(resumed)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  events = event_scalars(resumed / "tensorboard")
  assert events == jsonl_scalars(rows)
  before = dict(event_scalars(trained_run.workdir / "tensorboard")["tokens_per_sec"])
  assert [s for s, v in events["tokens_per_sec"] if v != before[s]] == [4, 5, 6]  # the new run's values


def test_a_run_that_died_before_its_first_checkpoint_is_logged_once_when_started_again(trained_run, tmp_path):
  """No checkpoint to restore: the rerun starts fresh, and the dead run's lines and events go first."""
  workdir = tmp_path / "w"
  shutil.copytree(trained_run.workdir, workdir)
  for step in ("3", "6"):
    shutil.rmtree(workdir / "checkpoints" / step)
  loop.run(trained_run.config, str(workdir), quiet=True)
  rows = read_rows(workdir)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert event_scalars(workdir / "tensorboard") == jsonl_scalars(rows)


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_the_log_itself_purges_on_resume_and_keeps_non_finite_values(tmp_path, where):
  """MetricsLog alone (no training): a run writes steps 1-5, a second log resumes from step 2; in a bucket
  (fsspec's in-memory filesystem stands in) the event files are uploaded whole at each line."""
  workdir = str(tmp_path) if where == "local" else f"memory://{tmp_path.name}/w"
  first = MetricsLog(workdir)
  for step in range(1, 6):
    first.write(step, loss=1.0 / step, lr=step * 1e-4)
  first.write(5, val_loss=float("nan"), val_ppl=float("inf"))
  first.close()
  second = MetricsLog(workdir)
  assert second.drop_after(2) == 4
  for step in range(3, 5):
    second.write(step, loss=10.0 + step, lr=step * 1e-4, grad_norm=float("-inf"))
  # (no close: a killed run's file is complete up to its last line)
  local = tmp_path / "tensorboard"
  if where == "bucket":
    fs = fsspec.filesystem("memory")
    local.mkdir()
    for path in fs.ls(f"{workdir}/tensorboard", detail=False):
      (local / path.rsplit("/", 1)[1]).write_bytes(fs.cat_file(path))
  events = event_scalars(local)
  assert events == jsonl_scalars(second.rows())
  assert events["loss"] == [(1, 1.0), (2, float(np.float32(0.5))), (3, 13.0), (4, 14.0)]
  assert events["grad_norm"] == [(3, None), (4, None)] and "val_loss" not in events  # (purged with step 5)


def test_a_reader_watching_during_the_resume_drops_the_killed_runs_later_steps(tmp_path):
  """TensorBoard loaded the killed run's steps 1-4 before the resume from step 2 rewrote its file: the
  resumed run's restart event makes that reader drop steps 3 and 4 when it reloads."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  killed = MetricsLog(str(tmp_path))
  for step in range(1, 5):
    killed.write(step, loss=float(step))
  reader = EventAccumulator(str(tmp_path / "tensorboard"))
  reader.Reload()
  assert [e.step for e in reader.Scalars("loss")] == [1, 2, 3, 4]
  resumed = MetricsLog(str(tmp_path))
  resumed.drop_after(2)
  resumed.write(3, loss=30.0)
  reader.Reload()
  assert [(e.step, e.value) for e in reader.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url: str):
  with urllib.request.urlopen(url, timeout=10) as response:
    return json.loads(response.read())


TENSORBOARD = shutil.which("tensorboard", path=os.path.dirname(sys.executable)) or shutil.which("tensorboard")


def _data_server() -> bool:
  try:
    import tensorboard_data_server
  except ImportError:
    return False
  return tensorboard_data_server.server_binary() is not None


@pytest.mark.skipif(TENSORBOARD is None, reason="no `tensorboard` executable (pip install tensorboard)")
@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_a_tensorboard_server_serves_the_loss_of_metrics_jsonl(resumed, tmp_path, load_fast):
  """What a browser on `tensorboard --logdir=WORKDIR` is sent: the run `tensorboard`, each key of
  metrics.jsonl, each step once with the resumed run's values, from either reader the server may use: its
  Rust data server (the default where it is installed) and its Python one (--load_fast=false)."""
  if load_fast == "true" and not _data_server():
    pytest.skip("no tensorboard-data-server binary for this platform")
  port, log = _free_port(), tmp_path / "tensorboard.log"
  with open(log, "w") as out:  # (a file, not a pipe: a pipe nobody reads could fill and stop the server)
    server = subprocess.Popen([TENSORBOARD, f"--logdir={resumed}", "--host=127.0.0.1", f"--port={port}",
                               "--reload_interval=1", f"--load_fast={load_fast}"], stdout=out, stderr=out)
  base = f"http://127.0.0.1:{port}/data/plugin/scalars"
  try:
    deadline = time.monotonic() + 120
    while True:
      try:
        if "loss" in _get(f"{base}/tags").get("tensorboard", {}):
          break
      except (urllib.error.URLError, ConnectionError):
        pass
      assert server.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, "tensorboard served no loss in 120 s"
      time.sleep(0.5)
    expected = jsonl_scalars(read_rows(resumed))
    served = {tag: _get(f"{base}/scalars?run=tensorboard&tag={tag}") for tag in expected}  # [[time, step, value]]
  finally:
    server.terminate()
    server.wait(timeout=30)
  assert {tag: [(step, value) for _, step, value in points] for tag, points in served.items()} == expected
  assert [step for _, step, _ in served["loss"]] == [1, 2, 3, 4, 5, 6]


def test_event_files_sort_in_the_order_they_were_opened(tmp_path):
  """Readers take a folder's files in name order: within one second and past the tenth file of a process
  (a resumed run's file must come after the one it resumes), names sort as they were opened."""
  from jaxlm.event_files import EventFile

  opened = []
  for _ in range(12):
    f = EventFile(str(tmp_path))
    opened.append(os.path.basename(f.path))
    f.close()
  assert sorted(os.listdir(tmp_path)) == opened and len(set(opened)) == 12
