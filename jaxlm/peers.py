"""A multi-process run that loses a process ends everywhere within seconds, with one line.

Left to itself, JAX's coordination service (jax 0.10.2) ends the survivors of a SIGKILLed process with
a C++ fatal error after its heartbeat timeout (100 s by default), after a Gloo traceback and a hang in
the atexit shutdown barrier; when process 0, which hosts the service, dies, the others abort at once.
So, when jaxlm joins a distributed run (`start`), it uses JAX's own runtime like this:

- recoverability on (`jax_enable_recoverability`): the service marks a dead process instead of
  aborting everyone, and its heartbeat timeout is JAXLM_HEARTBEAT_SECONDS (default 20);
- a watchdog thread on every process asks the service which processes are alive, every second
  (`get_live_nodes`, a rendezvous of the live processes): one missing is one line naming it, exit 3;
- when the service itself is gone (process 0 died), each survivor's runtime calls abort(): a SIGABRT
  handler, installed through libc because Python's own handlers cannot run inside an abort, prints the
  line and exits 3; C++ logging is held below FATAL (TF_CPP_MIN_LOG_LEVEL=4, unless you set it) so
  that nothing is printed before it;
- recoverable mode has no shutdown barrier, so `leave` orders the end: a barrier, then process 0
  waits for the others to disconnect before it stops the service.
Measured (2 processes on 2 cores, heartbeat 20 s): a survivor of process 1 exits in ~10-20 s, a
survivor of process 0 in under a second.
"""

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time

import jax

from jaxlm.errors import UserError

LOST_EXIT = 3  # as RunFailed's: the run cannot go on; what was saved is intact
END_BARRIER_MS = 120_000  # how long processes that ended well wait for each other
FAILED_BARRIER_MS = 10_000  # ...and processes that failed (with the same error, they arrive together)


def heartbeat_seconds() -> int:
  text = os.environ.get("JAXLM_HEARTBEAT_SECONDS", "20")
  if not text.isdigit() or int(text) < 1:
    raise UserError(f"JAXLM_HEARTBEAT_SECONDS={text!r} is not a whole number of seconds",
                    "e.g. JAXLM_HEARTBEAT_SECONDS=20, or unset it")
  return int(text)


class _Peers:
  def __init__(self):
    self.client = None
    self.count, self.index = 1, 0
    self.stopping = threading.Event()
    self.verdict = threading.Lock()
    self.abort_handler = None  # the ctypes callback (kept alive while installed)


_peers = _Peers()


def before_initialize() -> None:
  """Call before jax.distributed.initialize: recoverable mode, quiet C++ fatals, the abort handler."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "4")
  if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "4":
    from jax._src.lib import utils  # the runtime setter: jaxlib may already be loaded

    utils.absl_set_min_log_level(4)
  jax.config.update("jax_enable_recoverability", True)
  _install_abort_handler()


def start() -> None:
  """Call after jax.distributed.initialize: the watchdog thread."""
  from jax._src import distributed  # (the coordination service client; no public handle to it)

  _peers.client, _peers.count, _peers.index = distributed.global_state.client, jax.process_count(), jax.process_index()
  if _peers.count > 1:
    threading.Thread(target=_watch, name="jaxlm-peers", daemon=True).start()
    # (The CLI leaves explicitly; this is for the Python API. It runs before JAX's own atexit shutdown.)
    atexit.register(leave, failed=True)


def _watch() -> None:
  everyone = list(range(_peers.count))
  while not _peers.stopping.is_set():
    try:
      alive = _peers.client.get_live_nodes(everyone)
    except jax.errors.JaxRuntimeError:  # the service is gone: process 0 died
      lost([0])
      return
    if dead := [i for i in everyone if i not in alive]:
      lost(dead)
      return
    _peers.stopping.wait(1.0)


def lost(processes: list[int]) -> None:
  """The one line, then leave at once (os._exit: the atexit shutdown would wait for the dead)."""
  if _peers.stopping.is_set() or not _peers.verdict.acquire(blocking=False):
    return
  if _peers.index == 0 and _peers.count > 2:
    time.sleep(1.0)  # (the service goes with us: let the others see who was lost first)
  names = ", ".join(f"{i}{' (the coordinator)' if i == 0 else ''}" for i in processes)
  sys.stdout.flush()
  print(f"jaxlm: error: lost process {names} of {_peers.count}: it exited or was killed (see its log; "
        "run the same command again to resume from the last checkpoint)", file=sys.stderr, flush=True)
  os._exit(LOST_EXIT)


def _install_abort_handler() -> None:
  def on_abort(signum):
    # Runs inside the aborting C++ thread, which holds the runtime's locks: never call the client here.
    if _peers.stopping.is_set():
      os._exit(0)  # (a teardown abort after every process passed the end barrier)
    if _peers.index != 0 and not _coordinator_reachable():
      lost([0])
    os.write(2, b"jaxlm: error: the JAX runtime aborted (a C++ fatal error) (run again with "
                b"TF_CPP_MIN_LOG_LEVEL=0 to see its message)\n")
    os._exit(134)

  _peers.abort_handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
  libc = ctypes.CDLL(None)
  libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p]
  libc.signal(signal.SIGABRT, ctypes.cast(_peers.abort_handler, ctypes.c_void_p).value)


# An HTTP/2 client preface and an empty SETTINGS frame: a live gRPC server answers with its own SETTINGS.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _coordinator_reachable() -> bool:
  """After an abort only: does process 0's service still answer? Accepting a connection is not enough:
  a SIGKILLed process's listening socket outlives its threads while the kernel frees its memory (a
  second or more on a loaded machine), and takes connections that no one will serve. So it says an
  HTTP/2 hello, which a live gRPC server answers at once (tried 3 times, 2 s each)."""
  from jax._src import distributed

  address = distributed.global_state.coordinator_address or ""
  host, _, port = address.rpartition(":")
  if not port.isdigit():
    return False
  for _ in range(3):
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2) as connection:
        connection.sendall(_HTTP2_HELLO)
        return bool(connection.recv(9))  # (b"": it closed the connection, as a dying server does)
    except TimeoutError:
      continue
    except OSError:  # refused, reset: no one listens there any more
      return False
  return False


def settle() -> None:
  """An exception escaped a command of a multi-process run. A lost peer makes the collectives fail
  this way (Gloo: "Connection reset by peer", as a ValueError or a JaxRuntimeError): then the watchdog
  ends the process within a heartbeat, with its line. If no peer was lost, the exception is ours and
  goes on with its traceback, a heartbeat later."""
  if _peers.count > 1:
    _peers.stopping.wait(heartbeat_seconds() + 10)


def leave(failed: bool) -> None:
  """The end of a command in a multi-process run: every process reaches a barrier, then process 0
  waits for the others to disconnect and stops the service. A process whose peers do not get there
  (they failed otherwise, or are still working) leaves at once."""
  if _peers.client is None or _peers.count == 1 or _peers.stopping.is_set():
    return
  try:
    _peers.client.wait_at_barrier("jaxlm:end", FAILED_BARRIER_MS if failed else END_BARRIER_MS)
  except jax.errors.JaxRuntimeError:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LOST_EXIT)
  _peers.stopping.set()
  if _peers.index == 0:
    deadline = time.monotonic() + 30
    with contextlib.suppress(jax.errors.JaxRuntimeError):
      while time.monotonic() < deadline and len(_peers.client.get_live_nodes(list(range(_peers.count)))) > 1:
        time.sleep(0.05)
  jax.distributed.shutdown()
