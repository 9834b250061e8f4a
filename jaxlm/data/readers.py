"""Raw text corpora for `jaxlm prepare`: which files to read, and the documents in each.

A .txt/.text/.md file is one document (its whole text); a .jsonl file holds one document per non-blank
line, the string at a chosen field, or, for fine-tuning, one (prompt, response) example per line, the
strings at two chosen fields. Either may be gzipped. Files are read in binary and decoded here, so a bad
byte is reported at its exact offset in the (decompressed) file.
"""

import codecs
import contextlib
import dataclasses
import gzip
import json
import os
import re
import threading
import zlib
from collections.abc import Iterator

from jaxlm.errors import UserError

SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".txt.gz", ".text.gz", ".md.gz", ".jsonl.gz")

_BOM = codecs.BOM_UTF8
_STRICT_HINT = "fix the file, or drop --strict_utf8 to replace bad bytes with U+FFFD"
_FIELD_HINT = "set --text_field=NAME to the field that holds the text"
_PAIRS_HINT = "set --pairs=PROMPT,RESPONSE to the fields that hold them"
_INPUT_HINT = f"give files or folders of {', '.join(SUFFIXES)}"
_SURROGATE = re.compile("[\ud800-\udfff]")  # only JSON escapes like "\ud800" can put one in a str
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}  # what json.loads returns

# A decode error handler that replaces like "replace" and counts each invalid sequence it replaces.
_REPLACE = "jaxlm.count_replace"
_counter = threading.local()


def _count_replace(e: UnicodeError) -> tuple[str, int]:
  _counter.count += 1
  return "\ufffd", e.end


codecs.register_error(_REPLACE, _count_replace)


@dataclasses.dataclass
class ReadStats:
  files: int = 0
  documents: int = 0
  bytes: int = 0  # raw (decompressed) bytes read
  replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD


def _supported(path: str) -> bool:
  return path.lower().endswith(SUFFIXES)


def _is_hidden(name: str) -> bool:
  return name.startswith(".")


def _walk_error(e: OSError) -> None:
  raise UserError(f"cannot read folder {e.filename}: {e.strerror or e}", "check its permissions")


def _folder_files(folder: str) -> list[str]:
  """The supported, non-hidden files under `folder`, following symlinks, in sorted path order."""
  found, seen_dirs = [], set()
  for root, dirs, files in os.walk(folder, onerror=_walk_error, followlinks=True):
    seen_dirs.add(os.path.realpath(root))
    dirs[:] = [d for d in dirs
               if not _is_hidden(d) and os.path.realpath(os.path.join(root, d)) not in seen_dirs]
    for name in files:
      path = os.path.join(root, name)
      if not _is_hidden(name) and _supported(name) and os.path.isfile(path):
        found.append(path)
  return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def list_inputs(paths: list[str]) -> list[str]:
  """The files to read: folders expanded recursively (sorted; hidden entries skipped), each file once."""
  if not paths:
    raise UserError("no input files given", _INPUT_HINT)
  out, seen = [], set()
  for path in paths:
    if not os.path.exists(path):
      raise UserError(f"input {path} does not exist", "check the path")
    if os.path.isdir(path):
      files = _folder_files(path)
      if not files:
        raise UserError(f"folder {path} has no input files",
                        f"it needs non-hidden files ending in {', '.join(SUFFIXES)}")
    elif not _supported(path):
      raise UserError(f"input {path} has an unsupported suffix", f"supported: {', '.join(SUFFIXES)}")
    else:
      files = [path]
    for f in files:
      real = os.path.realpath(f)
      if real not in seen:
        seen.add(real)
        out.append(f)
  if not out:
    raise UserError("no input files found", _INPUT_HINT)
  return out


def decode_utf8(data: bytes | memoryview, *, strict: bool, where: str, offset: int = 0) -> tuple[str, int]:
  """(text, number of invalid sequences replaced by U+FFFD); `where` and `offset` (the file offset of
  data[0]) name the first bad byte when `strict`."""
  if strict:
    try:
      return codecs.utf_8_decode(data, "strict", True)[0], 0
    except UnicodeDecodeError as e:
      raise UserError(f"{where}: invalid UTF-8 at byte {offset + e.start}", _STRICT_HINT) from None
  _counter.count = 0
  text = codecs.utf_8_decode(data, _REPLACE, True)[0]
  return text, _counter.count


@contextlib.contextmanager
def _read_errors(path: str) -> Iterator[None]:
  """Turns I/O and gzip failures while reading `path` into UserErrors."""
  try:
    yield
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise UserError(f"{path}: corrupt gzip data ({e})",
                    "re-create the .gz file, or give it uncompressed") from None
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror or e}", "check that it is a readable file") from None


def _open(path: str):
  return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _read_whole(path: str) -> bytes:
  with _read_errors(path), _open(path) as f:
    return f.read()


def _lines(path: str) -> Iterator[tuple[int, int, bytes]]:
  """(1-based line number, byte offset of the line, its bytes with the newline) for each line."""
  offset = 0
  with _read_errors(path), _open(path) as f:
    for number, line in enumerate(f, 1):
      yield number, offset, line
      offset += len(line)


def _text_document(path: str, strict: bool, stats: ReadStats) -> str:
  raw = _read_whole(path)
  stats.bytes += len(raw)
  start = len(_BOM) if raw.startswith(_BOM) else 0
  text, replaced = decode_utf8(memoryview(raw)[start:], strict=strict, where=path, offset=start)
  stats.replaced += replaced
  return text


def _json_value(where: str, text: str):
  """The JSON value of the line at `where` (path:line)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.pos + 1})",
                    "each line of a .jsonl file must be one JSON object") from None
  except RecursionError:
    raise UserError(f"{where}: not valid JSON (nested too deeply)",
                    "each line of a .jsonl file must be one JSON object") from None


def _fix_surrogates(doc: str, where: str, strict: bool, stats: ReadStats) -> str:
  """Unpaired surrogate escapes ("\\ud800") cannot be UTF-8 encoded: U+FFFD, or an error when strict."""
  if not _SURROGATE.search(doc):
    return doc
  if strict:
    raise UserError(f"{where}: JSON string has an unpaired surrogate escape", _STRICT_HINT)
  fixed, count = _SURROGATE.subn("\ufffd", doc)
  stats.replaced += count
  return fixed


def _jsonl_values(path: str, strict: bool, stats: ReadStats) -> Iterator[tuple[str, object, bool]]:
  """(where: path:line, its JSON value, whether it has a \\u escape) for each non-blank line."""
  for number, offset, line in _lines(path):
    stats.bytes += len(line)
    skip = len(_BOM) if number == 1 and line.startswith(_BOM) else 0
    if not line[skip:].strip():
      continue
    body = line[skip:].rstrip(b"\r\n")  # so a JSON error at the end of the line gets a column on it
    text, replaced = decode_utf8(body, strict=strict, where=path, offset=offset + skip)
    stats.replaced += replaced
    where = f"{path}:{number}"
    yield where, _json_value(where, text), b"\\u" in line


def _jsonl_documents(path: str, field: str, strict: bool, stats: ReadStats) -> Iterator[str]:
  for where, value, escaped in _jsonl_values(path, strict, stats):
    if not isinstance(value, dict) or not isinstance(value.get(field), str):
      raise UserError(f"{where}: no string field {field!r}", _FIELD_HINT)
    doc = _fix_surrogates(value[field], where, strict, stats) if escaped else value[field]
    if doc:
      yield doc


def is_jsonl(path: str) -> bool:
  return path.lower().removesuffix(".gz").endswith(".jsonl")


def require_jsonl(path: str) -> None:
  """Examples come from JSONL fields, which a text file does not have."""
  if not is_jsonl(path):
    raise UserError(f"--pairs reads fields of .jsonl lines, and {path} is not a .jsonl file",
                    "give .jsonl or .jsonl.gz files, or drop --pairs")


def _pair_text(where: str, value: dict, field: str) -> str:
  if field not in value:
    raise UserError(f"{where}: no field {field!r}", _PAIRS_HINT)
  if not isinstance(value[field], str):
    raise UserError(f"{where}: field {field!r} is {_JSON_TYPES[type(value[field])]}, not a string",
                    "both --pairs fields must hold text")
  return value[field]


def iter_pairs(path: str, fields: tuple[str, str], *, strict_utf8: bool = False,
               stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
  """The (prompt, response) examples of a .jsonl file (optionally .gz), one per non-blank line: the strings
  at its two `fields`. An empty prompt is allowed; an empty response, with nothing to learn, is an error."""
  stats = stats if stats is not None else ReadStats()
  require_jsonl(path)
  prompt_field, response_field = fields
  for where, value, escaped in _jsonl_values(path, strict_utf8, stats):
    if not isinstance(value, dict):
      raise UserError(f"{where}: {_JSON_TYPES[type(value)]}, not an object with fields {prompt_field!r} and "
                      f"{response_field!r}", "each line of a .jsonl file must be one JSON object")
    prompt, response = (_pair_text(where, value, field) for field in fields)
    if escaped:
      prompt, response = (_fix_surrogates(text, where, strict_utf8, stats) for text in (prompt, response))
    if not response:
      raise UserError(f"{where}: field {response_field!r} is empty", "every example needs a response to learn")
    stats.documents += 1
    yield prompt, response
  stats.files += 1


def iter_documents(path: str, *, text_field: str = "text", strict_utf8: bool = False,
                   stats: ReadStats | None = None) -> Iterator[str]:
  """The documents of one file: a text file (.txt/.text/.md, optionally .gz) is one document, its whole
  text; a .jsonl file (optionally .gz) is one per non-blank line, the string at `text_field`. A leading
  UTF-8 BOM is dropped, and empty documents are skipped."""
  stats = stats if stats is not None else ReadStats()
  if not _supported(path):
    raise UserError(f"input {path} has an unsupported suffix", f"supported: {', '.join(SUFFIXES)}")
  if is_jsonl(path):
    for doc in _jsonl_documents(path, text_field, strict_utf8, stats):
      stats.documents += 1
      yield doc
  else:
    doc = _text_document(path, strict_utf8, stats)
    if doc:
      stats.documents += 1
      yield doc
  stats.files += 1
