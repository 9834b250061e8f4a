"""glibc's allocator, tuned for XLA CPU from inside the process (what GLIBC_TUNABLES would do).

XLA CPU allocates and frees a step's temporaries every step. With glibc's defaults, blocks above the
mmap threshold are mmapped and unmapped each time and the heap is trimmed back to the OS, so every step
pays page faults on fresh memory. `mallopt` (through ctypes, after the process started) turns both off:
no mmapped blocks, no trimming; memory stays at its high-water mark, which a training process reaches
in its first step anyway. Skipped when the user set GLIBC_TUNABLES, with JAXLM_MALLOPT=0, and off glibc.
"""

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # (malloc.h)
INT_MAX = 2**31 - 1


def tune() -> bool:
  """Applies the setting; True if it was applied."""
  if os.environ.get("GLIBC_TUNABLES") or os.environ.get("JAXLM_MALLOPT") == "0":
    return False
  name = ctypes.util.find_library("c")
  if not name or "libc.so" not in name:
    return False
  libc = ctypes.CDLL(name)
  if not hasattr(libc, "mallopt"):
    return False
  return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, INT_MAX))
