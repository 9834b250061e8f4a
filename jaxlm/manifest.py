"""A checkpoint step's seal, `jaxlm-manifest.json`: the size and checksum of every file it holds.

Process 0 writes it just before orbax commits the step (checkpoint.py); restoring compares a step with
it before trusting the step. Orbax checksums its own index but not the arrays' bytes, so without the
checksums a changed byte in an array file would restore silently. On a local disk the checksum is a
CRC-32 of the bytes (read once at the seal); in a bucket it is the object store's own CRC32C, which
one listing returns, so neither sealing nor checking downloads the step.
"""

import json
import zlib

import jax

from jaxlm import files
from jaxlm.errors import first_line

MANIFEST = "jaxlm-manifest.json"


def write_manifest(folder: str, step: int) -> None:
  """Seals a step. Step-level metadata that orbax rewrites on commit (a file at the top of the step) is
  only required to exist."""
  sizes = {name: size for name, size in files.walk_sizes(folder).items() if name != MANIFEST}
  nested = {name: size for name, size in sizes.items() if "/" in name}
  manifest = {"format": 3, "step": step, "files": {name: nested.get(name) for name in sizes}}
  if files.is_remote(folder):
    manifest["crc32c"] = {k: v for k, v in files.remote_checksums(folder).items() if k in nested}
  else:
    manifest["crc32"] = {name: _crc32(files.join(folder, name)) for name in nested}
  files.write_text(files.join(folder, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def _crc32(path: str) -> int:
  crc = 0
  with files.open_read(path) as f:
    while block := f.read(1 << 22):
      crc = zlib.crc32(block, crc)
  return crc


def step_problem(folder: str, checksums: bool = False) -> str | None:
  """Why the step folder is not the one that was saved, or None if its files match its manifest
  (their sizes; with `checksums`, on process 0, their bytes too: locally that reads the whole step)."""
  try:
    manifest = json.loads(files.read_text(files.join(folder, MANIFEST)))
    sizes, crcs, crc32c = manifest["files"], manifest.get("crc32", {}), manifest.get("crc32c", {})
  except FileNotFoundError:
    return f"{MANIFEST} is missing (the save did not finish)"
  except (ValueError, KeyError, TypeError) as e:
    return f"{MANIFEST} is unreadable ({first_line(e, typed=True)})"
  found = files.walk_sizes(folder)
  for name, size in sorted(sizes.items()):
    if name not in found:
      return f"{name} is missing"
    if size is not None and found[name] != size:
      return f"{name} has {found[name]} bytes, {size} were written"
  if checksums and jax.process_index() == 0:
    stored = files.remote_checksums(folder) if crc32c else {}
    for name, crc in sorted(crc32c.items()):
      if stored.get(name) != crc:
        return f"{name} does not match its checksum (its bytes changed after the save)"
    for name, crc in sorted(crcs.items()):
      if _crc32(files.join(folder, name)) != crc:
        return f"{name} does not match its checksum (its bytes changed after the save)"
  return None
