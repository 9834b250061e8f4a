"""One run per workdir in a bucket, where there are no file locks: WORKDIR/jaxlm.lock as a lease.

The holder writes its record (host, pid, start, command) and renews it every RENEW_SECONDS from a
thread. Another run is refused while the lease is fresh. A lease is taken over when it was not renewed
for LEASE_SECONDS (its holder was killed, or lost its machine), or at once when its holder was on this
host and that process is gone (a SIGKILLed run restarted on the same machine). The first lease is
created with a generation precondition, so of two runs starting together in the same second, one
wins (a real bucket enforces it; the local emulator of the tests does not). A clean end deletes it.
"""

import json
import os
import socket
import threading
import time

from jaxlm import files
from jaxlm.errors import warn

LEASE_SECONDS = 120.0
RENEW_SECONDS = 30.0


class Lease:
  def __init__(self, path: str, record: dict):
    self.path, self.record = path, record
    self._stop = threading.Event()
    self._thread = None

  def take(self) -> str | None:
    """None once this process holds the lease, else who holds it (for the error line)."""
    try:
      held = json.loads(files.read_text(self.path))
    except FileNotFoundError:
      held = None
    except ValueError:
      held = {}  # (a record cut short: nobody can be holding it by that)
    if held is None:
      if not files.create_exclusive(self.path, self._bytes()):
        return "another jaxlm run (it took the lock just now)"
    elif (holder := _live_holder(held)) is not None:
      return holder
    else:
      files.write_bytes(self.path, self._bytes())
    self._thread = threading.Thread(target=self._renew, name="jaxlm-lease", daemon=True)
    self._thread.start()
    return None

  def _bytes(self) -> bytes:
    return (json.dumps({**self.record, "renewed": time.time()}) + "\n").encode()

  def _renew(self) -> None:
    """Renews until closed. A failed renewal (the bucket did not answer) is warned about and tried again
    at the next interval: the lease lapses only after LEASE_SECONDS without one."""
    while not self._stop.wait(RENEW_SECONDS):
      try:
        files.write_bytes(self.path, self._bytes())
      except files.errors() as e:
        warn(f"could not renew the workdir's lease {self.path} ({e}); trying again in {RENEW_SECONDS:g} s")

  def close(self) -> None:
    """Gives the lease back (if it is still ours)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      try:
        mine = json.loads(files.read_text(self.path)).get("pid") == self.record["pid"]
      except (FileNotFoundError, ValueError):
        mine = False
      if mine:
        files.remove(self.path)


def _live_holder(held: dict) -> str | None:
  """Who holds a lease that is still in force, or None if it may be taken over."""
  age = time.time() - float(held.get("renewed", 0))
  if age > LEASE_SECONDS:
    return None
  if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
    return None
  return (f"pid {held.get('pid')} on {held.get('host')} since {held.get('since')} ({held.get('command')}; "
          f"its lease was renewed {age:.0f} s ago and lapses {LEASE_SECONDS:.0f} s after a run is lost)")


def _alive(pid) -> bool:
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
