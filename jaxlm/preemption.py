"""SIGTERM / SIGINT become a request to stop cleanly: finish the step, save a checkpoint, exit 0.

Schedulers (Cloud TPU maintenance, SLURM, Kubernetes) send SIGTERM and wait a grace period before
SIGKILL. The loop asks `stop_requested(signals, step)` after every step. With several processes they
must stop at the same step, and they agree through JAX's preemption service, as MaxText does: the
service's C++ SIGTERM handler notices the signal, tells every process, and they agree on a step a
little ahead (`multihost_utils.reached_preemption_sync_point`); between notices, asking costs no
communication at all (measured: benchmarks/stop_agreement.py). Our Python handler (the message, Ctrl-C
twice) replaces that C++ handler while the loop runs, so it calls it itself: a SIGINT, or a SIGTERM
that reaches one process only, becomes the same notice. Without the service (turned off with
`jax_enable_preemption_service`, or JAXLM_STOP_AGREEMENT=allgather) the processes agree with one small
allgather per step instead.
"""

import ctypes
import os
import signal
import sys
import threading

import jax

from jaxlm.parallel import all_agree

_SIGACTION_BYTES = 256  # larger than any libc's struct sigaction; its first field is the handler


class StopSignals:
  """Context manager: while inside, SIGTERM and SIGINT set a flag instead of killing the process.

  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    self._notify = None  # the preemption service's SIGTERM handler (a C function), in multi-process runs
    self._native = None  # the kernel's SIGTERM action before we came (restored on exit)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      if _sync_manager() is not None:
        self._native, self._notify = _native_sigterm()
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    if self._native is not None:  # (Python's restore set SIG_DFL: put the service's handler back)
      _libc().sigaction(signal.SIGTERM, self._native, None)
      self._native = None

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      print(f"\njaxlm: second {name}: aborting without saving", file=sys.stderr, flush=True)
      os._exit(130)
    if self.received is None:
      print(f"\njaxlm: {name} received: finishing this step, then saving a checkpoint "
            "(press Ctrl-C again to abort)", file=sys.stderr, flush=True)
      if self._notify is not None:
        self._notify(signal.SIGTERM)  # (sets the service's flag; its own thread tells the others)
    self.received = self.received or name

  @property
  def agreed_by_service(self) -> bool:
    return self._notify is not None


def stop_requested(signals: StopSignals, step: int) -> bool:
  """Whether to stop after `step` (the number of steps done); the same answer on every process."""
  if jax.process_count() == 1:
    return signals.received is not None
  if signals.agreed_by_service:
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)
  return not all_agree(signals.received is None)


def _sync_manager():
  """JAX's preemption sync manager of a multi-process run, or None (one process, or turned off)."""
  if jax.process_count() == 1 or os.environ.get("JAXLM_STOP_AGREEMENT") == "allgather":
    return None
  from jax._src import distributed  # (no public handle; multihost_utils reads the same)

  return distributed.global_state.preemption_sync_manager


def _libc():
  libc = ctypes.CDLL(None, use_errno=True)
  libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
  return libc


def _native_sigterm():
  """(the saved sigaction, the C handler as a callable), or (None, None) when the process has none of
  its own (SIG_DFL, SIG_IGN, or Python's: nothing of the service to call)."""
  if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
    return None, None  # (Python installed one: not the service's)
  saved = ctypes.create_string_buffer(_SIGACTION_BYTES)
  if _libc().sigaction(signal.SIGTERM, None, saved) != 0:
    return None, None
  address = ctypes.c_void_p.from_buffer(saved).value or 0
  if address in (0, 1):  # SIG_DFL, SIG_IGN
    return None, None
  return saved, ctypes.CFUNCTYPE(None, ctypes.c_int)(address)
