"""A checkpoint step's seal, `jaxlm-manifest.json`: the size and CRC-32 of every file it holds.

Process 0 writes it just before orbax commits the step (checkpoint.py); restoring compares a step with
it before trusting the step. Orbax checksums its own index but not the arrays' bytes, so without the
CRCs a changed byte in an array file would restore silently.
"""

import json
import os
import zlib

import jax

from jaxlm.errors import first_line

MANIFEST = "jaxlm-manifest.json"


def write_manifest(folder: str, step: int) -> None:
  """Seals a step: the size and CRC-32 of every file (orbax checksums its own index but not the
  arrays' bytes). Step-level metadata that orbax rewrites on commit is only required to exist."""
  files, crcs = {}, {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, folder)
      if relative == MANIFEST:
        continue
      if os.sep in relative:
        files[relative], crcs[relative] = os.path.getsize(path), _crc32(path)
      else:
        files[relative] = None
  tmp = os.path.join(folder, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": 2, "step": step, "files": files, "crc32": crcs}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(folder, MANIFEST))


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(1 << 22):
      crc = zlib.crc32(block, crc)
  return crc


def step_problem(folder: str, checksums: bool = False) -> str | None:
  """Why the step folder is not the one that was saved, or None if its files match its manifest
  (their sizes; with `checksums`, on process 0, their bytes too: that reads the whole step)."""
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      manifest = json.load(f)
    files, crcs = manifest["files"], manifest.get("crc32", {})  # (format 1 had no checksums)
  except FileNotFoundError:
    return f"{MANIFEST} is missing (the save did not finish)"
  except (ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST} is unreadable ({first_line(e, typed=True)})"
  for name, size in sorted(files.items()):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      return f"{name} is missing"
    if size is not None and os.path.getsize(path) != size:
      return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
  if checksums and jax.process_index() == 0:
    for name, crc in sorted(crcs.items()):
      if _crc32(os.path.join(folder, name)) != crc:
        return f"{name} does not match its checksum (its bytes changed after the save)"
  return None
