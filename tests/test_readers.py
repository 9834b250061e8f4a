"""Tests for reading raw corpora (jaxlm.data.readers): inputs, documents, stats and every user error."""

import builtins
import gzip
import itertools
import json
import os

import pytest

from jaxlm.data.readers import SUFFIXES, ReadStats, iter_documents, list_inputs
from jaxlm.errors import UserError

MULTILINGUAL = "héllo wörld — 日本語 — 🙂👍🏽"
BOM = b"\xef\xbb\xbf"
STRICT_HINT = "fix the file, or drop --strict_utf8 to replace bad bytes with U+FFFD"
FIELD_HINT = "set --text_field=NAME to the field that holds the text"
is_root = hasattr(os, "geteuid") and os.geteuid() == 0


def write(path, data: bytes | str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = data.encode() if isinstance(data, str) else data
  if str(path).lower().endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)
  return str(path)


def jsonl(*values, ensure_ascii=False) -> bytes:
  return "".join(json.dumps(v, ensure_ascii=ensure_ascii) + "\n" for v in values).encode()


def docs(path, **kwargs) -> list[str]:
  return list(iter_documents(str(path), **kwargs))


def error(fn, *args, **kwargs) -> UserError:
  with pytest.raises(UserError) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value), "one line"
  return info.value


# list_inputs


def test_folder_expands_recursively_sorted_with_suffix_filter_and_hidden_skipped(tmp_path):
  for name in ["b.txt", "a.md", "sub/c.jsonl", "sub/deep/d.txt.gz", "a0/e.text", "A.MD", "x.jsonl.gz",
               "notes.csv", "data.json", "archive.tar.gz", "x.txt.bz2", ".hidden.txt", ".git/config.txt",
               "sub/.cache/f.md", "noext"]:
    write(tmp_path / name, "x")
  os.makedirs(tmp_path / "empty_dir")
  got = [os.path.relpath(p, tmp_path) for p in list_inputs([str(tmp_path)])]
  assert got == ["A.MD", "a.md", "a0/e.text", "b.txt", "sub/c.jsonl", "sub/deep/d.txt.gz", "x.jsonl.gz"]
  assert list_inputs([str(tmp_path)]) == list_inputs([str(tmp_path)])


def test_explicit_files_keep_their_order_and_every_suffix_is_accepted(tmp_path):
  paths = [write(tmp_path / f"f{i}{suffix}", "x") for i, suffix in enumerate(reversed(SUFFIXES))]
  assert list_inputs(paths) == paths


def test_explicit_hidden_file_is_kept(tmp_path):
  path = write(tmp_path / ".secret.txt", "x")
  assert list_inputs([path]) == [path]


def test_same_file_is_listed_once(tmp_path):
  a = write(tmp_path / "d" / "a.txt", "x")
  b = write(tmp_path / "d" / "b.txt", "y")
  os.symlink(a, tmp_path / "link.txt")
  got = list_inputs([a, str(tmp_path / "d"), a, str(tmp_path / "link.txt"), str(tmp_path / "d" / ".." / "d")])
  assert got == [a, b]


def test_symlinks_are_followed_and_loops_end(tmp_path):
  target = tmp_path / "target"
  write(target / "t.txt", "x")
  os.makedirs(tmp_path / "corpus")
  write(tmp_path / "corpus" / "own.md", "y")
  os.symlink(target, tmp_path / "corpus" / "linked")
  os.symlink(target / "t.txt", tmp_path / "corpus" / "z.txt")
  os.symlink(tmp_path / "corpus", tmp_path / "corpus" / "loop")
  got = [os.path.relpath(p, tmp_path / "corpus") for p in list_inputs([str(tmp_path / "corpus")])]
  assert got == ["linked/t.txt", "own.md"]  # z.txt is the same real file as linked/t.txt


def test_empty_list_is_an_error():
  e = error(list_inputs, [])
  assert e.what == "no input files given"
  assert ".jsonl.gz" in e.hint


def test_missing_path_is_an_error(tmp_path):
  missing = str(tmp_path / "nope.txt")
  e = error(list_inputs, [missing])
  assert e.what == f"input {missing} does not exist"


def test_broken_symlink_is_a_missing_path(tmp_path):
  os.symlink(tmp_path / "gone.txt", tmp_path / "broken.txt")
  assert "does not exist" in error(list_inputs, [str(tmp_path / "broken.txt")]).what


def test_unsupported_suffix_is_an_error_listing_the_suffixes(tmp_path):
  path = write(tmp_path / "data.csv", "a,b")
  e = error(list_inputs, [path])
  assert e.what == f"input {path} has an unsupported suffix"
  assert e.hint == "supported: " + ", ".join(SUFFIXES)
  assert str(e) == f"{e.what} ({e.hint})"


@pytest.mark.parametrize("contents", [[], ["a.csv", ".hidden.txt", ".dir/x.md", "sub/readme"]])
def test_folder_without_supported_files_is_an_error(tmp_path, contents):
  folder = tmp_path / "corpus"
  os.makedirs(folder)
  for name in contents:
    write(folder / name, "x")
  e = error(list_inputs, [str(folder)])
  assert e.what == f"folder {folder} has no input files"
  assert ".txt" in e.hint


# documents


def test_text_file_is_one_document(tmp_path):
  text = "First line.\n\nSecond paragraph.\r\nno newline at end"
  for suffix in [".txt", ".text", ".md", ".txt.gz", ".text.gz", ".md.gz"]:
    assert docs(write(tmp_path / f"a{suffix}", text)) == [text]


def test_jsonl_is_one_document_per_line(tmp_path):
  data = jsonl({"text": "one"}, {"text": "two\nlines", "id": 2}, {"id": 3, "text": "three"})
  expected = ["one", "two\nlines", "three"]
  assert docs(write(tmp_path / "a.jsonl", data)) == expected
  assert docs(write(tmp_path / "a.jsonl.gz", data)) == expected


def test_uppercase_suffixes_are_read_by_kind(tmp_path):
  assert docs(write(tmp_path / "A.JSONL", jsonl({"text": "j"}))) == ["j"]
  assert docs(write(tmp_path / "B.TXT.GZ", '{"text": "t"}')) == ['{"text": "t"}']


@pytest.mark.parametrize("suffix", [".txt", ".md.gz"])
def test_multilingual_text_round_trips(tmp_path, suffix):
  assert docs(write(tmp_path / f"m{suffix}", MULTILINGUAL)) == [MULTILINGUAL]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_multilingual_jsonl_round_trips(tmp_path, suffix, ensure_ascii):
  stats = ReadStats()
  path = write(tmp_path / f"m{suffix}", jsonl({"text": MULTILINGUAL}, ensure_ascii=ensure_ascii))
  assert docs(path, stats=stats) == [MULTILINGUAL]
  assert stats.replaced == 0


def test_custom_text_field(tmp_path):
  path = write(tmp_path / "c.jsonl", jsonl({"text": "not this", "content": "a"}, {"content": "b"}))
  assert docs(path, text_field="content") == ["a", "b"]


def test_blank_lines_are_skipped(tmp_path):
  data = b'\n{"text": "a"}\n\n   \n\t\r\n{"text": "b"}\r\n\n{"text": "c"}'
  assert docs(write(tmp_path / "b.jsonl", data)) == ["a", "b", "c"]


def test_bom_is_dropped(tmp_path):
  assert docs(write(tmp_path / "b.txt", BOM + "hé".encode())) == ["hé"]
  assert docs(write(tmp_path / "b.md.gz", BOM + b"x")) == ["x"]
  assert docs(write(tmp_path / "b.jsonl", BOM + jsonl({"text": "a"}, {"text": "b"}))) == ["a", "b"]
  assert docs(write(tmp_path / "c.jsonl", BOM + b"\n" + jsonl({"text": "a"}))) == ["a"]


def test_only_a_leading_bom_is_dropped(tmp_path):
  assert docs(write(tmp_path / "b.txt", b"a" + BOM + b"b")) == ["a\ufeffb"]


def test_empty_documents_are_skipped(tmp_path):
  stats = ReadStats()
  assert docs(write(tmp_path / "e.txt", b""), stats=stats) == []
  assert docs(write(tmp_path / "bom.txt", BOM), stats=stats) == []
  assert docs(write(tmp_path / "e.jsonl", jsonl({"text": ""}, {"text": "x"})), stats=stats) == ["x"]
  assert docs(write(tmp_path / "blank.jsonl", b"\n\n"), stats=stats) == []
  assert stats == ReadStats(files=4, documents=1, bytes=3 + 14 + 13 + 2, replaced=0)


def test_jsonl_is_read_lazily_line_by_line(tmp_path):
  path = write(tmp_path / "l.jsonl", jsonl({"text": "a"}, {"text": "b"}) + b"not json\n")
  assert list(itertools.islice(iter_documents(path), 2)) == ["a", "b"]


def test_stats_add_up_over_files(tmp_path):
  stats = ReadStats()
  a = write(tmp_path / "a.txt", "héllo")  # 6 bytes
  b = write(tmp_path / "b.jsonl.gz", jsonl({"text": "x"}, {"text": "y"}) + b"\n")  # 14 + 14 + 1
  c = write(tmp_path / "c.txt.gz", b"a\xffb")
  for path in [a, b, c]:
    list(iter_documents(path, stats=stats))
  assert stats == ReadStats(files=3, documents=4, bytes=6 + 29 + 3, replaced=1)


def test_stats_count_a_file_only_when_fully_read(tmp_path):
  stats = ReadStats()
  path = write(tmp_path / "a.jsonl", jsonl({"text": "x"}, {"text": "y"}))
  next(iter_documents(path, stats=stats))
  assert (stats.files, stats.documents) == (0, 1)


# invalid UTF-8


@pytest.mark.parametrize("raw, expected_text, events", [
    (b"ab\xffcd\xfe\xfe", "ab\ufffdcd\ufffd\ufffd", 3),  # each bad byte is its own error
    (b"\xe6\x97a", "\ufffda", 1),  # a truncated 3-byte sequence is one error
    (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd", 3),  # an encoded surrogate: three errors, as Python reports
    ("ok \ufffd already".encode() + b"\xff", "ok \ufffd already\ufffd", 1),  # a real U+FFFD is not counted
])
def test_invalid_utf8_is_replaced_and_counted(tmp_path, raw, expected_text, events):
  stats = ReadStats()
  assert docs(write(tmp_path / "bad.txt", raw), stats=stats) == [expected_text]
  assert stats.replaced == events
  stats = ReadStats()
  line = b'{"text": "' + raw + b'"}\n'
  assert docs(write(tmp_path / "bad.jsonl.gz", line * 2), stats=stats) == [expected_text] * 2
  assert stats.replaced == 2 * events


def test_strict_utf8_reports_the_byte_offset_in_a_text_file(tmp_path):
  raw = "line one\n日本".encode() + b"\xffrest\xfe"  # 9 + 6 bytes before the bad one
  for name in ["s.txt", "s.txt.gz"]:
    path = write(tmp_path / name, raw)
    e = error(docs, path, strict_utf8=True)
    assert e.what == f"{path}: invalid UTF-8 at byte 15"
    assert e.hint == STRICT_HINT


def test_strict_utf8_offset_counts_the_bom(tmp_path):
  path = write(tmp_path / "s.md", BOM + b"ab\x80")
  assert error(docs, path, strict_utf8=True).what == f"{path}: invalid UTF-8 at byte 5"


def test_strict_utf8_reports_the_byte_offset_on_jsonl_line_3(tmp_path):
  bad = '{"text": "日本'.encode() + b"\xc3(" + b'"}\n'
  lines = [BOM + b'{"text": "one"}\n', b"\n", bad, b'{"text": "ok"}\n']
  offset = len(lines[0]) + len(lines[1]) + len('{"text": "日本'.encode())
  for name in ["s.jsonl", "s.jsonl.gz"]:
    path = write(tmp_path / name, b"".join(lines))
    e = error(docs, path, strict_utf8=True)
    assert e.what == f"{path}: invalid UTF-8 at byte {offset}"
    assert e.hint == STRICT_HINT


def test_strict_utf8_accepts_valid_text(tmp_path):
  assert docs(write(tmp_path / "ok.txt", MULTILINGUAL), strict_utf8=True) == [MULTILINGUAL]
  assert docs(write(tmp_path / "ok.jsonl", jsonl({"text": MULTILINGUAL})), strict_utf8=True) == [MULTILINGUAL]


def test_unpaired_surrogate_escape_in_json(tmp_path):
  path = write(tmp_path / "s.jsonl", b'{"text": "a\\ud800b\\udc00"}\n{"text": "pair \\ud83d\\ude42"}\n')
  stats = ReadStats()
  assert docs(path, stats=stats) == ["a\ufffdb\ufffd", "pair 🙂"]
  assert stats.replaced == 2
  e = error(docs, path, strict_utf8=True)
  assert e.what == f"{path}:1: JSON string has an unpaired surrogate escape"


# JSONL errors


def test_bad_json_names_the_line(tmp_path):
  path = write(tmp_path / "j.jsonl", b'{"text": "a"}\n\n{"text": "b"\n')
  e = error(docs, path)
  assert e.what.startswith(f"{path}:3: not valid JSON (")
  assert e.what == f"{path}:3: not valid JSON (Expecting ',' delimiter at column 13)"


def test_bad_json_in_gzip_names_the_line(tmp_path):
  path = write(tmp_path / "j.jsonl.gz", jsonl({"text": "a"}) + b"{text: 1}\n")
  assert error(docs, path).what.startswith(f"{path}:2: not valid JSON (")


@pytest.mark.parametrize("line", [b'{"body": "x"}', b'["text"]', b'"text"', b"42", b"null", b'{"text": 3}',
                                  b'{"text": null}', b'{"text": ["a"]}', b'{"text": {"a": 1}}'])
def test_missing_or_non_string_field(tmp_path, line):
  path = write(tmp_path / "f.jsonl", jsonl({"text": "ok"}) + line + b"\n")
  e = error(docs, path)
  assert e.what == f"{path}:2: no string field 'text'"
  assert e.hint == FIELD_HINT


def test_missing_custom_field_names_it(tmp_path):
  path = write(tmp_path / "f.jsonl", jsonl({"text": "x"}))
  assert error(docs, path, text_field="content").what == f"{path}:1: no string field 'content'"


# I/O errors


@pytest.mark.parametrize("name", ["c.txt.gz", "c.jsonl.gz"])
def test_file_that_is_not_gzip(tmp_path, name):
  path = write(tmp_path / "plain", b"this is not gzip data")
  os.rename(path, tmp_path / name)
  path = str(tmp_path / name)
  e = error(docs, path)
  assert e.what.startswith(f"{path}: corrupt gzip data (")


@pytest.mark.parametrize("name", ["t.txt.gz", "t.jsonl.gz"])
def test_truncated_gzip(tmp_path, name):
  path = write(tmp_path / name, jsonl(*({"text": f"document {i}" * 20} for i in range(200))))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  assert error(docs, path).what.startswith(f"{path}: corrupt gzip data (")


def test_gzip_with_corrupt_payload(tmp_path):
  path = write(tmp_path / "x.txt.gz", b"abc" * 5000 + b"tail")
  with open(path, "rb") as f:
    data = bytearray(f.read())
  for i in range(12, len(data) - 8):  # the deflate stream, past the header, before the CRC
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)
  assert error(docs, path).what.startswith(f"{path}: corrupt gzip data (")


@pytest.mark.skipif(is_root, reason="root can read a chmod 000 file")
def test_unreadable_file_chmod(tmp_path):
  path = write(tmp_path / "locked.txt", "x")
  os.chmod(path, 0)
  try:
    e = error(docs, path)
  finally:
    os.chmod(path, 0o644)
  assert e.what == f"cannot read {path}: Permission denied"


@pytest.mark.parametrize("name", ["u.txt", "u.jsonl", "u.md.gz"])
def test_unreadable_file(tmp_path, monkeypatch, name):
  path = write(tmp_path / name, "x")
  real_open = builtins.open

  def deny(file, *args, **kwargs):
    if str(file) == path:
      raise PermissionError(13, "Permission denied", path)
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", deny)
  e = error(docs, path)
  assert e.what == f"cannot read {path}: Permission denied"


def test_folder_given_to_iter_documents(tmp_path):
  os.makedirs(tmp_path / "dir.txt")
  e = error(docs, str(tmp_path / "dir.txt"))
  assert e.what == f"cannot read {tmp_path / 'dir.txt'}: Is a directory"


def test_unsupported_suffix_given_to_iter_documents(tmp_path):
  path = write(tmp_path / "x.json", "{}")
  assert error(docs, path).what == f"input {path} has an unsupported suffix"


def test_unreadable_subfolder(tmp_path, monkeypatch):
  write(tmp_path / "a.txt", "x")
  write(tmp_path / "locked" / "b.txt", "y")
  locked, real_scandir = str(tmp_path / "locked"), os.scandir

  def deny(path="."):
    if str(path) == locked:
      raise PermissionError(13, "Permission denied", locked)
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", deny)
  e = error(list_inputs, [str(tmp_path)])
  assert e.what == f"cannot read folder {locked}: Permission denied"
