"""The safetensors format, read and written with numpy alone (no torch; bfloat16 through ml_dtypes).

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (and an
optional "__metadata__" of strings), then the tensors' raw little-endian bytes. A checkpoint is one
`model.safetensors` or shards listed by `model.safetensors.index.json`'s weight_map.
"""

import json
import struct

import ml_dtypes
import numpy as np

from jaxlm import files
from jaxlm.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_file(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file, by name (arrays over the file's bytes, read once)."""
  data = files.read_bytes(path)
  header, start = _header(data, path)
  tensors = {}
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    dtype, shape, (begin, end) = _spec(spec, name, path)
    if not start + end <= len(data) or begin > end or (end - begin) != np.dtype(dtype).itemsize * _size(shape):
      raise UserError(f"{path}: tensor {name}'s bytes ({begin}..{end}) do not fit its shape {tuple(shape)} "
                      f"and dtype, or the file is cut short", "the file is damaged; download it again")
    tensors[name] = np.frombuffer(data, dtype, _size(shape), start + begin).reshape(shape)
  return tensors


def _header(data: bytes, path: str) -> tuple[dict, int]:
  damaged = f"{path} is not a safetensors file"
  if len(data) < 8:
    raise UserError(damaged + " (shorter than its header)", "the file is damaged; download it again")
  (length,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + length])
  except (ValueError, UnicodeDecodeError):
    raise UserError(damaged + " (its header is not JSON)", "the file is damaged; download it again") from None
  if not isinstance(header, dict):
    raise UserError(damaged + " (its header is not a JSON object)", "the file is damaged; download it again")
  return header, 8 + length


def _spec(spec, name: str, path: str):
  try:
    dtype, shape, offsets = DTYPES[spec["dtype"]], [int(n) for n in spec["shape"]], spec["data_offsets"]
    return dtype, shape, (int(offsets[0]), int(offsets[1]))
  except KeyError as e:
    raise UserError(f"{path}: tensor {name} has dtype {spec.get('dtype')!r} or lacks {e}",
                    f"jaxlm reads dtypes {', '.join(DTYPES)}") from None


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def shard_files(folder: str) -> list[str]:
  """The .safetensors files of a Hugging Face checkpoint folder: its index's shards, or model.safetensors."""
  index = files.join(folder, INDEX)
  if files.isfile(index):
    try:
      weight_map = json.loads(files.read_text(index))["weight_map"]
    except (ValueError, KeyError, TypeError):
      raise UserError(f"{index} has no weight_map", "the folder is damaged; download it again") from None
    return [files.join(folder, name) for name in sorted(set(weight_map.values()))]
  single = files.join(folder, SINGLE)
  if files.isfile(single):
    return [single]
  found = [n for n in files.listdir(folder) if n.endswith(".safetensors")]
  if found:
    return [files.join(folder, n) for n in sorted(found)]
  other = [n for n in files.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  raise UserError(f"{folder} has no .safetensors weights" + (f" (only {', '.join(sorted(other))})" if other else ""),
                  "jaxlm reads safetensors only (a .bin is code to unpickle): save the model with "
                  "save_pretrained(DIR, safe_serialization=True)")


def read_folder(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint folder, by name, over all its shards."""
  tensors = {}
  for path in shard_files(folder):
    tensors.update(read_file(path))
  return tensors


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (C order, little-endian) as one .safetensors file, atomically."""
  header, offset, chunks = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _NAMES:
      raise TypeError(f"{name}: dtype {array.dtype} has no safetensors name")
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)  # (no copy)
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + raw.size]}
    chunks.append(raw)
    offset += raw.size
  if metadata:
    header["__metadata__"] = dict(metadata)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # (the tensors start 8-byte aligned, as the reference writer does)
  files.write_parts(path, [struct.pack("<Q", len(text)) + text, *chunks])
