"""Storage failures: a full disk during a save is one line and loses nothing; what orbax and
tensorstore raise is told apart (damage, transient, full, permission, or not a storage error at all)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from jaxlm import storage_errors as se
from jaxlm.errors import UserError


def wrapped(inner):
  try:
    raise inner
  except BaseException as e:  # noqa: BLE001 - how orbax wraps the error of an array read
    try:
      raise Exception("Encountered error while reading array index: (slice(0, 256, 1),)") from e
    except Exception as outer:  # noqa: BLE001
      return outer


FULL = ("RESOURCE_EXHAUSTED: Error writing \"params.w/0\" in OCDBT database at local file \"/w/\": Failed to "
        "write 1077248 bytes to file 4: No space left on device [os_error_code='28']")
# Messages as tensorstore 0.1.86 and orbax 0.12.8 raised them here (see storage_errors.py).
CASES = [
    (ValueError(FULL), se.FULL),
    (OSError(errno.ENOSPC, "No space left on device"), se.FULL),
    (ValueError("RESOURCE_EXHAUSTED: Failed writing: Disk quota exceeded [os_error_code='122']"), se.FULL),
    (PermissionError(errno.EACCES, "Permission denied"), se.PERMISSION),
    (wrapped(ValueError("PERMISSION_DENIED: Failed to open: \"/w/d/x\": Permission denied [os_error_code='13']")),
     se.PERMISSION),
    (ValueError("DATA_LOSS: Error decoding manifest: CRC-32C checksum verification failed"), se.DAMAGE),
    (wrapped(ValueError("OUT_OF_RANGE: Requested byte range [0, 262144) is not valid for value of size 100000")),
     se.DAMAGE),
    (wrapped(ValueError("FAILED_PRECONDITION: Not enough data")), se.DAMAGE),
    (json.JSONDecodeError("Expecting value", "", 0), se.DAMAGE),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), se.DAMAGE),
    (ValueError("UNAVAILABLE: connection refused"), se.TRANSIENT),
    (ValueError("ABORTED: All 1 retry attempts failed: CURL error [curl_code='7']"), se.TRANSIENT),
    (TimeoutError(), se.TRANSIENT),
    (wrapped(MemoryError("Unable to allocate 64.0 GiB")), None),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 68719476736 bytes."), None),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not match"), None),
    (RuntimeError("a bug of ours"), None),
]


@pytest.mark.parametrize("error, kind", CASES, ids=[f"{type(e).__name__}-{k}" for e, k in CASES])
def test_what_a_storage_exception_means(error, kind):
  assert se.kind_of(error) == kind


SCRIPT = """set -u
mount -t tmpfs -o size=6m tmpfs "$DISK" || exit 99
head -c 2400000 /dev/zero > "$DISK/ballast"  # room for three checkpoints of 1.1 MB and the run's other files
"$PYTHON" -m jaxlm.cli train $ARGS > "$OUT/out1" 2> "$OUT/err1"; echo $? > "$OUT/code1"
ls "$DISK/w/checkpoints" > "$OUT/steps1"
rm "$DISK/ballast"
"$PYTHON" -m jaxlm.cli train $ARGS > "$OUT/out2" 2> "$OUT/err2"; echo $? > "$OUT/code2"
ls "$DISK/w/checkpoints" > "$OUT/steps2"
"""


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
  """`jaxlm train` on a 6 MB filesystem that fills at the 4th checkpoint, then again after space was freed.

  The filesystem is a tmpfs in a private mount namespace (`unshare`), gone when the script ends."""
  if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
    pytest.skip("needs unshare with user and mount namespaces to make a small filesystem")
  out = tmp_path_factory.mktemp("full")
  (out / "disk").mkdir()
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(DISK=str(out / "disk"), OUT=str(out), PYTHON=sys.executable,
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             ARGS=f"--config={ROOT}/tests/tiny.py --workdir={out}/disk/w --config.train.steps=15")
  done = subprocess.run(["unshare", "-Urm", "sh", "-c", SCRIPT], env=env, cwd=ROOT, timeout=300)
  if done.returncode == 99:
    pytest.skip("cannot mount a tmpfs in a user namespace here")
  return {name: (out / name).read_text() for name in
          ("code1", "err1", "steps1", "code2", "out2", "err2", "steps2")}


@pytest.mark.parametrize("where", ["metrics", "plot"])
def test_a_full_disk_while_writing_the_logs_or_the_plot_is_one_line(where, monkeypatch, tmp_path):
  """metrics.jsonl, the TensorBoard events and loss.png on a full disk: one line naming the file, as a
  checkpoint save's."""
  from conftest import tiny_config

  from jaxlm import loop, metrics, plots

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(*((metrics.MetricsLog, "_write", full) if where == "metrics" else (plots, "write_png", full)))
  config = tiny_config()
  config.mesh.data = -1
  with pytest.raises(UserError) as e:
    loop.run(config, str(tmp_path / "w"), quiet=True)
  what = "metrics.jsonl and TensorBoard's events" if where == "metrics" else "loss.png"
  assert e.value.what == f"No space left on device in {tmp_path / 'w'} while writing {what}", e.value
  assert "free space and run the same command again" in e.value.hint


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_older_steps(full_disk):
  lines = full_disk["err1"].splitlines()
  assert full_disk["code1"].strip() == "2" and len(lines) == 1, full_disk["err1"][-3000:]
  assert lines[0].startswith("jaxlm: error: No space left on device in ")
  assert "while saving checkpoint step 12: a checkpoint needs about 1.1 MB" in lines[0]
  assert full_disk["steps1"].split() == ["12.orbax-checkpoint-tmp", "3", "6", "9"]


def test_after_space_is_freed_the_same_command_resumes_and_sets_the_partial_step_aside(full_disk):
  assert full_disk["code2"].strip() == "0", full_disk["err2"][-3000:]
  assert "resumed from" in full_disk["out2"] and "/checkpoints/9" in full_disk["out2"]
  assert full_disk["err2"].splitlines() == [
      line for line in full_disk["err2"].splitlines() if "checkpoint step 12 was never completed" in line]
  assert "12.incomplete" in full_disk["steps2"].split() and "15" in full_disk["steps2"].split()
