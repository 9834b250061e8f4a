"""A workdir and a store in a bucket (gs://) behave as on a disk: on a local GCS emulator, a run killed
and restarted equals an uninterrupted local run bit for bit, a damaged newest step falls back, `sample`
reads the workdir, and one run per workdir holds through a lease."""

import json
import os
import signal
import socket
import time

import pytest
from conftest import ROOT
from gcs import emulated_gcs
from processes import spawn_jaxlm
from test_preemption import saved_arrays
from test_tensorboard import event_scalars, jsonl_scalars

from jaxlm import bucket_lock, files
from jaxlm.errors import UserError
from jaxlm.metrics import SPEED_KEYS, parse_rows

STEPS = 60
RUN = ["train", f"--config={ROOT}/tests/tiny.py", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=5",
       "--config.train.eval_every=10", "--config.train.log_every=1"]


@pytest.fixture(scope="module")
def bucket():
  with emulated_gcs() as url:
    yield url


def run(args, timeout=300, **kw):
  proc = spawn_jaxlm(args, devices=1, **kw)[0]
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def metrics(workdir):
  rows = [json.loads(line) for line in files.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  for row in rows:
    for key in SPEED_KEYS:  # wall-clock speed, the one thing allowed to differ
      row.pop(key, None)
  return rows


def checkpoint_steps(workdir):
  return sorted(int(n) for n in files.listdir(f"{workdir}/checkpoints") if n.isdigit())


@pytest.fixture(scope="module")
def stores(bucket, tmp_path_factory):
  """The same text prepared into a local folder and into the bucket."""
  tmp = tmp_path_factory.mktemp("gcs-stores")
  text = tmp / "text.txt"
  text.write_text(open(f"{ROOT}/jaxlm/data/fairytales.py").read() * 8)  # (~100 KB of real text)
  out = {}
  for name, output in (("local", str(tmp / "store")), ("bucket", f"{bucket}/store")):
    code, _, err = run(["prepare", f"--input={text}", f"--output={output}"])
    assert code == 0, err[-2000:]
    out[name] = output
  return out


@pytest.fixture(scope="module")
def killed_and_resumed(bucket, stores, tmp_path_factory):
  """(the bucket workdir: killed after its checkpoint of step 10, then rerun to the end; the local
  reference run; how many steps were saved when it was killed)."""
  reference = str(tmp_path_factory.mktemp("gcs-ref") / "w")
  code, _, err = run([*RUN, f"--workdir={reference}", f"--config.data.path={stores['local']}"])
  assert code == 0, err[-2000:]
  workdir = f"{bucket}/run"
  command = [*RUN, f"--workdir={workdir}", f"--config.data.path={stores['bucket']}"]
  proc = spawn_jaxlm(command, devices=1, outputs=lambda i: (None, None))[0]
  deadline = time.monotonic() + 240
  while not files.exists(f"{workdir}/checkpoints/10/jaxlm-manifest.json"):
    assert proc.poll() is None and time.monotonic() < deadline, "the bucket run ended before step 10"
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = checkpoint_steps(workdir)
  code, out, err = run(command)
  assert code == 0, err[-3000:]
  return workdir, reference, saved, out


def test_a_bucket_run_killed_and_rerun_equals_an_uninterrupted_local_run(killed_and_resumed):
  workdir, reference, saved, out = killed_and_resumed
  assert saved and saved[-1] < STEPS  # it really died mid-run
  assert f"resumed from {workdir}/checkpoints/" in out
  assert metrics(workdir) == metrics(reference)
  ours, theirs = saved_arrays(workdir, STEPS), saved_arrays(reference, STEPS)
  assert ours.keys() == theirs.keys()
  for name in theirs:
    assert (ours[name] == theirs[name]).all(), name
  names = files.listdir(workdir)
  assert {"config.json", "tokenizer.json", "metrics.jsonl", "checkpoints"} <= set(names)
  assert "jaxlm.lock" not in names  # a clean end gives the lease back


def test_a_bucket_runs_tensorboard_equals_its_metrics_jsonl_after_the_kill(killed_and_resumed, tmp_path):
  workdir = killed_and_resumed[0]
  names = files.listdir(f"{workdir}/tensorboard")
  assert len(names) == 2  # the killed run's event file and the rerun's
  for name in names:
    (tmp_path / name).write_bytes(files.read_bytes(f"{workdir}/tensorboard/{name}"))
  rows = parse_rows(files.read_text(f"{workdir}/metrics.jsonl"))
  events = event_scalars(tmp_path)
  assert events == jsonl_scalars(rows)
  assert [step for step, _ in events["loss"]] == list(range(1, STEPS + 1))


def test_sample_reads_a_bucket_workdir(killed_and_resumed):
  code, out, err = run(["sample", f"--workdir={killed_and_resumed[0]}", "--max_new_tokens=8", "--prompt=Once"])
  assert code == 0 and out.startswith("Once"), err[-2000:]


def test_a_damaged_newest_step_in_a_bucket_falls_back_to_the_previous(killed_and_resumed, stores):
  workdir = killed_and_resumed[0]
  folder = f"{workdir}/checkpoints/{STEPS}"
  arrays = sorted(name for name in files.walk_sizes(folder) if name.startswith("state/") and "/d/" in name)
  victim = f"{folder}/{arrays[0]}"
  data = bytearray(files.read_bytes(victim))
  data[len(data) // 2] ^= 0xFF  # one flipped byte, the same size: only the checksum can tell
  files.write_bytes(victim, bytes(data))
  code, out, err = run([*RUN, f"--workdir={workdir}", f"--config.data.path={stores['bucket']}",
                        f"--config.train.steps={STEPS + 2}"])
  assert code == 0, err[-3000:]
  assert (f"checkpoint step {STEPS} is damaged: {arrays[0]} does not match its checksum" in err
          and f"moved it to {folder}.damaged; trying step {STEPS - 5}" in err), err[-3000:]
  assert f"resumed from {workdir}/checkpoints/{STEPS - 5}" in out
  assert files.exists(f"{folder}.damaged/{arrays[0]}")
  assert checkpoint_steps(workdir)[-1] == STEPS + 2


def test_a_live_lease_refuses_a_second_run_and_a_dead_one_is_taken_over(bucket, monkeypatch):
  workdir = f"{bucket}/leased"
  lock = f"{workdir}/jaxlm.lock"
  mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-12-02T00:00:00", "command": "pytest"}
  files.write_text(lock, json.dumps({**mine, "renewed": time.time()}))
  files.write_text(f"{workdir}/config.json", "{}")  # (the workdir exists: the lock is taken before the data)
  code, _, err = run([*RUN, f"--workdir={workdir}"])
  assert code == 2 and err.startswith(f"jaxlm: error: workdir {workdir} is in use by pid {os.getpid()} on "
                                      f"{socket.gethostname()}"), err[-2000:]
  assert len(err.strip().splitlines()) == 1
  dead = bucket_lock.Lease(lock, {**mine, "pid": 2**22 + 12345})  # (above any pid this test machine uses)
  files.write_text(lock, json.dumps({**mine, "pid": 2**22 + 12345, "renewed": time.time()}))
  assert dead.take() is None  # its holder was on this host and is gone: taken over at once
  dead.close()
  assert not files.exists(lock)
  elsewhere = {**mine, "host": "another-host"}
  files.write_text(lock, json.dumps({**elsewhere, "renewed": time.time()}))
  assert "another-host" in bucket_lock.Lease(lock, mine).take()  # a fresh lease of another host holds
  files.write_text(lock, json.dumps({**elsewhere, "renewed": time.time() - bucket_lock.LEASE_SECONDS - 1}))
  lease = bucket_lock.Lease(lock, mine)
  assert lease.take() is None  # ...until it lapses
  assert json.loads(files.read_text(lock))["pid"] == os.getpid()
  lease.close()


def test_a_missing_bucket_or_workdir_is_one_line(bucket):
  code, _, err = run([*RUN, "--workdir=gs://no-such-bucket/run"])
  assert code == 2 and err.strip().splitlines()[-1] == (
      "jaxlm: error: workdir gs://no-such-bucket/run: there is no bucket no-such-bucket (create it (gcloud "
      "storage buckets create gs://no-such-bucket) or fix the --workdir)"), err[-2000:]
  code, _, err = run(["sample", f"--workdir={bucket}/never-trained"])
  assert code == 2 and err.strip().splitlines()[-1] == (
      f"jaxlm: error: workdir {bucket}/never-trained does not exist (give the --workdir of a training run)")
  code, _, err = run([*RUN, f"--workdir={bucket}/w2", f"--config.data.path={bucket}/no-store"])
  assert code == 2 and err.strip().splitlines()[-1].startswith(
      f"jaxlm: error: {bucket}/no-store is not a prepared token store (no meta.json"), err[-2000:]


def test_a_failed_lease_renewal_is_warned_about_and_retried(tmp_path, monkeypatch, capsys):
  """(On a local path: the lease logic is the same; only the bucket's requests differ.)"""
  monkeypatch.setattr(bucket_lock, "RENEW_SECONDS", 0.05)
  lock = str(tmp_path / "jaxlm.lock")
  lease = bucket_lock.Lease(lock, {"host": socket.gethostname(), "pid": os.getpid()})
  assert lease.take() is None
  first = json.loads(files.read_text(lock))["renewed"]
  real, calls = files.write_bytes, []

  def flaky(path, data):
    calls.append(path)
    if len(calls) == 1:
      raise OSError("503 Service Unavailable")
    real(path, data)
  monkeypatch.setattr(bucket_lock.files, "write_bytes", flaky)
  deadline = time.monotonic() + 10
  while json.loads(files.read_text(lock))["renewed"] == first and time.monotonic() < deadline:
    time.sleep(0.02)
  lease.close()
  assert len(calls) >= 2 and not os.path.exists(lock)  # renewed after the failure; given back at the end
  assert f"could not renew the workdir's lease {lock} (503 Service Unavailable)" in capsys.readouterr().err


def test_a_bucket_path_without_gcsfs_installed_is_one_line_naming_the_extra(monkeypatch):
  import fsspec

  def missing(protocol, **kw):
    raise ImportError("Install gcsfs to access Google Storage")
  monkeypatch.setattr(fsspec, "filesystem", missing)
  files._filesystem.cache_clear()
  try:
    with pytest.raises(UserError) as caught:
      files.exists("gs://b/run")
  finally:
    files._filesystem.cache_clear()
  assert caught.value.what == "gs:// paths need an fsspec filesystem: Install gcsfs to access Google Storage"
  assert caught.value.exit_code == 2 and caught.value.hint == "pip install 'jaxlm[gcs]' (gcsfs) for gs:// workdirs"
