"""What a device can do: its peak bf16 matmul FLOP/s and its memory, by `device.device_kind`.

Accelerator figures are the vendors' dense bf16 peaks (no sparsity) and HBM per chip. A CPU has no
such figure: its peak is measured by `cpu_peak_flops`, a sub-second float32 matmul probe of the
machine (shared by its simulated devices), and its memory is the host's.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

GIB = 1 << 30

# (a substring of device_kind, lower case; peak bf16 FLOP/s per chip; memory bytes per chip). First match wins.
ACCELERATORS = (
    ("v6 lite", 918e12, 32 * GIB),  # TPU v6e (Trillium)
    ("v6e", 918e12, 32 * GIB),
    ("v5 lite", 197e12, 16 * GIB),  # TPU v5e
    ("v5e", 197e12, 16 * GIB),
    ("v5p", 459e12, 95 * GIB),
    ("v5", 459e12, 95 * GIB),  # ("TPU v5": v5p)
    ("v4", 275e12, 32 * GIB),
    ("h200", 989e12, 141 * GIB),
    ("h100", 989e12, 80 * GIB),  # SXM; the PCIe card is 756e12
    ("a100", 312e12, 80 * GIB),  # the 40 GiB card has the same peak
)


def accelerator(device_kind: str) -> tuple[float, int] | None:
  """(peak bf16 FLOP/s, memory bytes) of one chip of this kind, or None if jaxlm does not know it."""
  kind = device_kind.lower()
  for name, flops, memory in ACCELERATORS:
    if name in kind:
      return flops, memory
  return None


def cpu_peak_flops(n: int = 1024, seconds: float = 0.3) -> float:
  """This machine's float32 matmul FLOP/s, all its cores (the best of repeated n x n jnp.dot for about
  `seconds`). Simulated CPU devices share it. It runs on one device, under a mesh of its own (a caller's
  mesh of several devices would refuse it)."""
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.set_mesh(jax.sharding.Mesh(np.array([cpu]), ("probe",))):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), device=cpu)
    dot = jax.jit(jnp.dot)
    dot(x, x).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
      start = time.perf_counter()
      dot(x, x).block_until_ready()
      best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops_per_device(device: jax.Device) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from) for MFU."""
  if device.platform == "cpu":
    return cpu_peak_flops() / jax.local_device_count(), "the float32 matmul probe of this machine"
  known = accelerator(device.device_kind)
  if known is None:
    return 0.0, f"unknown for {device.device_kind!r}"
  return known[0], f"{device.device_kind} bf16 peak"


def host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
