"""The process tunes glibc's allocator itself: big blocks come from the heap, not from fresh mmaps."""

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
from jaxlm import allocator
applied = allocator.tune() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
before = libc.sbrk(0)
blocks = [libc.malloc(64 << 20) for _ in range(4)]  # above glibc's default mmap threshold
print(applied, (libc.sbrk(0) - before) >> 20)  # how much the heap grew, MiB
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_big_blocks_are_not_mmapped_each_time():
  def run(mode, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", **env}).stdout.split()
    return out[0] == "True", int(out[1])
  assert run("plain") == (False, 0)  # glibc's default: each 64 MB block is an mmap of its own
  applied, grown = run("tune")
  assert applied and grown >= 256  # from the heap
  assert run("tune", GLIBC_TUNABLES="glibc.malloc.mmap_max=0")[0] is False  # the user's own setting wins
  assert run("tune", JAXLM_MALLOPT="0") == (False, 0)
