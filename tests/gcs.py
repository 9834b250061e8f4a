"""A local Google Cloud Storage for tests: the PyPI `gcp-storage-emulator` on 127.0.0.1, in memory.

`emulated_gcs()` starts it and points every client at it through the variables the libraries read:
tensorstore's gcs driver TENSORSTORE_GCS_HTTP_URL (with GOOGLE_AUTH_TOKEN_FOR_TESTING), gcsfs (which
orbax's epath and jaxlm's files.py use) STORAGE_EMULATOR_HOST. gcsfs's experimental bucket-type lookup
(a gRPC call the emulator does not serve, 60 s per bucket before it falls back) is turned off.
What the emulator does not do (checked): it ignores a listing's startOffset/endOffset, with which
tensorstore deletes a key range (gcs_emulator.py adds them); it does not enforce `ifGenerationMatch=0`
(so an exclusive create overwrites); it has no moveTo API (gcsfs falls back to copy and delete,
logging the 501).
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

BUCKET = "jaxlm-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def emulated_gcs():
  """Yields the bucket's URL (gs://jaxlm-test) with os.environ pointing at the emulator."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start",
                           "--host=127.0.0.1",
                           f"--port={port}", f"--default-bucket={BUCKET}", "--no-store-on-disk"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert proc.poll() is None and time.monotonic() < deadline, "the GCS emulator did not start"
      time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  saved = dict(os.environ)
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="x",
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  try:
    yield f"gs://{BUCKET}"
  finally:
    os.environ.clear()
    os.environ.update(saved)
    proc.terminate()
    proc.wait(timeout=10)
