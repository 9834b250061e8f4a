"""The files of a workdir, on a local disk or in a bucket (`gs://bucket/path`): one small API.

Local paths go through `os` (writes are atomic: a temporary file, fsync, rename). URLs go through
fsspec (`gcsfs` for gs://, the `gcs` extra), as orbax's own epath does; the arrays of checkpoints and
stores go through tensorstore's own gcs driver instead. An object store has no folders, renames or
appends: a "folder" is a prefix, a rename is a copy then a delete (not atomic, so jaxlm never relies on
one for safety: a step is sealed by its manifest), and an append rewrites the object.
Listings are never cached: another process (a peer, a run being trained) may change them at any time.
"""

import functools
import os
import posixpath
import tempfile

from jaxlm.errors import UserError


def _no_listing_caches() -> None:
  """gcsfs caches folder listings per client, and orbax's epath shares one client: after a restore, a
  save in the same process then misses the step folder it just created ("Checkpoint directory does
  not exist", seen on the emulator). Every gs:// client jaxlm's process makes lists afresh."""
  import fsspec

  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_no_listing_caches()


def is_remote(path: str) -> bool:
  return "://" in str(path)


def absolute(path: str) -> str:
  return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return posixpath.join(str(path), *parts) if is_remote(path) else os.path.join(path, *parts)


def split(path: str) -> tuple[str, str]:
  return posixpath.split(str(path).rstrip("/")) if is_remote(path) else os.path.split(path)


@functools.cache
def _filesystem(protocol: str):
  import fsspec

  try:
    return fsspec.filesystem(protocol)
  except (ImportError, ValueError) as e:
    raise UserError(f"{protocol}:// paths need an fsspec filesystem: {e}",
                    "pip install 'jaxlm[gcs]' (gcsfs) for gs:// workdirs") from None


def _fs(path: str):
  return _filesystem(str(path).split("://", 1)[0])


def exists(path: str) -> bool:
  return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fs(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names in a folder (empty when there is none)."""
  if not is_remote(path):
    return os.listdir(path) if os.path.isdir(path) else []
  fs = _fs(path)
  if not fs.isdir(path):
    return []
  return sorted({posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)})


def read_bytes(path: str) -> bytes:
  """The file's bytes; a missing file is FileNotFoundError, as for a local file."""
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  return _fs(path).cat_file(path)


def read_text(path: str) -> str:
  return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
  """Replaces the file as a whole: a reader sees the old bytes or the new, never a part."""
  write_parts(path, [data])


def write_parts(path: str, parts) -> None:
  """`write_bytes` of the parts (buffers: bytes, contiguous arrays) one after another, without joining them
  in memory first on a disk (a bucket's object is uploaded whole)."""
  if is_remote(path):
    _fs(path).pipe_file(path, b"".join(memoryview(p).cast("B") for p in parts))
    return
  folder = os.path.dirname(path) or "."
  with tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   delete=False) as f:
    for part in parts:
      f.write(part)
    f.flush()
    os.fsync(f.fileno())
  os.replace(f.name, path)


def makedirs(path: str) -> None:
  """A local folder and its parents (a bucket has no folders: nothing to do)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def create_exclusive(path: str, data: bytes) -> bool:
  """Writes the file only if it does not exist; False if it did. (GCS: a generation precondition.)"""
  if not is_remote(path):
    try:
      with open(path, "xb") as f:
        f.write(data)
      return True
    except FileExistsError:
      return False
  try:
    _fs(path).pipe_file(path, data, mode="create")
    return True
  except FileExistsError:
    return False


def remove(path: str) -> None:
  if is_remote(path):
    _fs(path).rm_file(path)
  else:
    os.remove(path)


def remove_tree(path: str) -> None:
  if is_remote(path):
    _fs(path).rm(path, recursive=True)
  else:
    import shutil

    shutil.rmtree(path)


def rename(source: str, target: str) -> None:
  """Moves a file or folder (in a bucket: copies each object, then deletes it)."""
  if is_remote(source):
    # Copy, then delete: gcsfs's mv first tries the moveTo API, which a bucket without hierarchical
    # namespace refuses, and retries it with backoff for each object before doing the same.
    fs = _fs(source)
    fs.copy(source, target, recursive=True)
    fs.rm(source, recursive=True)
  else:
    os.rename(source, target)


def walk_sizes(folder: str) -> dict[str, int]:
  """Every file under `folder` (relative name, with '/' between parts) -> its size in bytes."""
  if is_remote(folder):
    found, base = _fs(folder).find(folder, detail=True), _bucket_path(folder)
    return {name[len(base):]: int(info["size"]) for name, info in found.items()
            if info.get("type") == "file" and name.startswith(base)}
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
  return out


def remote_checksums(folder: str) -> dict[str, str]:
  """An object store's own CRC32C of every object under `folder` (relative name -> base64), from one
  listing: checking a step in a bucket never downloads it."""
  found, base = _fs(folder).find(folder, detail=True), _bucket_path(folder)
  return {name[len(base):]: info["crc32c"] for name, info in found.items()
          if info.get("type") == "file" and name.startswith(base) and info.get("crc32c")}


def errors() -> tuple[type[BaseException], ...]:
  """What a failed storage request raises: OSError, and gcsfs's HttpError (a request that still failed
  after gcsfs's own retries)."""
  try:
    from gcsfs.retry import HttpError
  except ImportError:
    return (OSError,)
  return (OSError, HttpError)


def _bucket_path(folder: str) -> str:
  """gs://b/run/ckpt -> 'b/run/ckpt/', how fsspec names the objects it lists."""
  return str(folder).split("://", 1)[1].rstrip("/") + "/"


def open_read(path: str):
  """A binary file object to stream (a checksum of a large local file)."""
  return _fs(path).open(path, "rb") if is_remote(path) else open(path, "rb")  # noqa: SIM115
