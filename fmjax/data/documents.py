"""Local files -> documents: glob resolution, decoding, and splitting into documents.

A `DocumentReader` is the recipe for one local corpus (file list + how to cut documents);
`iter_texts(i)` streams the documents of file i (text, JSONL or Parquet, plain or compressed:
see fmjax.data.formats); `file_documents(i)` lists the non-blank ones. A file holding NUL bytes or
invalid UTF-8 is "binary": it raises BinaryInput / is reported, and the caller refuses or skips it
(see fmjax.data.builders).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from typing import Iterator

from fmjax.runtime import paths
from fmjax.data import formats
from fmjax.data.errors import DataError


def resolve_files(pattern: str, what: str = 'data.files') -> list[str]:
  """Sorted absolute paths matched by a glob (`**` recurses); each must be a readable file."""
  if not pattern:
    raise DataError(f'{what} is empty: set it to a glob of input files, e.g. "corpus/*.txt"')
  try:
    found = sorted({p if paths.is_url(p) else os.path.abspath(p) for p in paths.glob(pattern)})
  except OSError as e:
    raise DataError(f'cannot list {what}={pattern!r}: {e}') from None
  if not found:
    raise DataError(f'{what}={pattern!r} matches no files: check the path/glob')
  for path in found:
    check_readable(path)
  return found


def check_readable(path: str) -> int:
  """The file's size, or DataError if it is missing (e.g. a broken link), not a file, or unreadable."""
  if paths.is_url(path):
    try:
      if not paths.isfile(path):
        raise DataError(f'input {path} is not a file: narrow the glob to match files only')
      return paths.size(path)
    except OSError as e:
      raise DataError(f'cannot read input file {path}: {e}') from None
  try:
    st = os.stat(path)
  except OSError as e:
    raise DataError(f'cannot read input file {path}: {e.strerror} (broken link or removed file?)') from None
  if not stat.S_ISREG(st.st_mode):
    raise DataError(f'input {path} is not a regular file: narrow the glob to match files only')
  if not os.access(path, os.R_OK):
    raise DataError(f'input file {path} is not readable: fix its permissions')
  return st.st_size


def read_utf8(path: str, what: str = 'file') -> str:
  """A whole UTF-8 text file (a leading BOM dropped); unreadable, binary (NUL bytes) or non-UTF-8
  content is a one-line DataError naming the file and the first bad byte."""
  try:
    raw = paths.read_bytes(path)
  except OSError as e:
    raise DataError(f'cannot read {what} {path}: {e.strerror or e}') from None
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = raw.count(b'\n', 0, e.start) + 1
    column = e.start - (raw.rfind(b'\n', 0, e.start) + 1) + 1
    raise DataError(f'{what} {path} is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}, '
                    f'column {column}) cannot be decoded; save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)') from None
  if '\0' in text:
    raise DataError(f'{what} {path} is binary (NUL bytes): give a UTF-8 text file')
  return text[1:] if text.startswith('\ufeff') else text


def name_files(paths: list[str], limit: int = 3) -> str:
  """'a, b, c and 4 more': the first `limit` paths and how many others."""
  shown = ', '.join(paths[:limit])
  return shown if len(paths) <= limit else f'{shown} and {len(paths) - limit} more'


def json_record(line: str, path: str, lineno: int) -> dict:
  """One JSONL line as an object; a bad line is a one-line DataError."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object') from None
  if not isinstance(record, dict):
    raise DataError(f'{path}:{lineno}: a JSON {type(record).__name__}, not an object; each line must be one '
                    'JSON object')
  return record


def jsonl_records(text: str, path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-blank line of JSONL text: the one JSONL reader of fmjax
  (pretraining documents and fine-tuning examples); a bad line is a one-line DataError."""
  for lineno, line in enumerate(text.split('\n'), 1):
    if line.strip():
      yield lineno, json_record(line, path, lineno)


def record_text(record: dict, path: str, lineno: int, field: str) -> str:
  """The `field` string of a JSONL record (one-line DataError if missing or not a string)."""
  if field not in record:
    raise DataError(f'{path}:{lineno}: no field {field!r}; set data.jsonl_field to the text field')
  value = record[field]
  if not isinstance(value, str):
    raise DataError(f'{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string')
  return value


def jsonl_texts(text: str, path: str, field: str) -> Iterator[str]:
  """The `field` string of each JSON line (blank lines skipped)."""
  for lineno, record in jsonl_records(text, path):
    yield record_text(record, path, lineno, field)


class BinaryInput(Exception):
  """Raised inside a document stream when a file turns out binary (NUL bytes or not UTF-8)."""

  def __init__(self, path: str):
    super().__init__(path)
    self.path = path


def _decode(raw: bytes, path: str, replace: bool, seen: list) -> str:
  """UTF-8 text of raw bytes; NUL bytes or invalid UTF-8 raise BinaryInput unless `replace`
  (then bad bytes become U+FFFD and `seen` gets True)."""
  try:
    text = raw.decode('utf-8')
    bad = '\0' in text
  except UnicodeDecodeError:
    text, bad = raw.decode('utf-8', errors='replace'), True
  if bad:
    if not replace:
      raise BinaryInput(path)
    seen.append(True)
  return text


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
  """Blank-line-separated paragraphs of a stream of lines (one paragraph in memory at a time)."""
  current: list[str] = []
  for line in lines:
    if not line.strip(' \t\r\f\v\n'):
      if current:
        yield ''.join(current).strip('\n')
      current = []
    else:
      current.append(line)
  if current:
    yield ''.join(current).strip('\n')


@dataclasses.dataclass
class DocumentReader:
  """The documents of local files. kind: text | jsonl | parquet; split_by: file | paragraph (text only);
  field: the JSONL field / Parquet column; binary_files: refuse | skip (no documents, reported) |
  replace (decoded with U+FFFD). Files are read as streams (fmjax.data.formats): one line (JSONL,
  paragraphs) or one row batch (Parquet) in memory at a time; a whole file only for split_by=file."""
  paths: list[str]
  kind: str = 'text'
  split_by: str = 'file'
  jsonl_field: str = 'text'
  binary_files: str = 'refuse'

  def iter_texts(self, index: int, seen_bad: list | None = None) -> Iterator[str]:
    """The documents of file `index` (blank ones included); raises BinaryInput for a binary file
    unless binary_files='replace' (then `seen_bad` gets an entry)."""
    path = self.paths[index]
    replace = self.binary_files == 'replace'
    seen = [] if seen_bad is None else seen_bad
    if self.kind == 'parquet':
      for row, value in enumerate(formats.parquet_texts(path, self.jsonl_field)):
        if value is None:
          continue
        if isinstance(value, bytes):
          value = _decode(value, path, replace, seen)
        elif not isinstance(value, str):
          raise DataError(f'{path}: row {row} of column {self.jsonl_field!r} is {type(value).__name__}, not text')
        elif '\0' in value:
          if not replace:
            raise BinaryInput(path)
          seen.append(True)
        yield value
      return
    formats.check_kind(path, self.kind)
    if self.kind == 'text' and self.split_by == 'file':
      text = _decode(formats.read_all(path), path, replace, seen)
      yield text[1:] if text.startswith('\ufeff') else text
      return
    lines = (_decode(raw, path, replace, seen) for raw in formats.iter_lines(path))
    lines = _strip_bom(lines)
    if self.kind == 'text':
      yield from _paragraphs(lines)
      return
    for lineno, line in enumerate(lines, 1):
      if line.strip():
        yield record_text(json_record(line, path, lineno), path, lineno, self.jsonl_field)

  def file_documents(self, index: int) -> tuple[list[tuple[str, str]], bool]:
    """The non-blank (key, text) documents of file `index` as a list, and whether the file is binary."""
    seen: list = []
    try:
      texts = list(self.iter_texts(index, seen))
    except BinaryInput:
      return [], True
    return [(f'{index:08d}-{j:08d}', doc) for j, doc in enumerate(texts) if doc.strip()], bool(seen)

  def fingerprint(self) -> list:
    """What identifies the inputs by content, not location: each file's path relative to the
    files' common folder, size, and a hash of its first and last 64 KiB; and the options that
    shape documents. A moved or copied corpus keeps its fingerprint."""
    root = os.path.commonpath([os.path.dirname(p) for p in self.paths]) if self.paths else ''
    files = [(os.path.relpath(path, root), check_readable(path), _sample_hash(path)) for path in self.paths]
    return [self.kind, self.split_by if self.kind == 'text' else '',
            self.jsonl_field if self.kind != 'text' else '', self.binary_files, files]


def _strip_bom(lines: Iterator[str]) -> Iterator[str]:
  first = next(lines, None)
  if first is None:
    return
  yield first[1:] if first.startswith('\ufeff') else first
  yield from lines


def _sample_hash(path: str, sample: int = 1 << 16) -> str:
  """SHA-1 of a file's first and last `sample` bytes (the whole file when small)."""
  h = hashlib.sha1()
  size = paths.size(path)
  with paths.open_file(path, 'rb') as f:
    h.update(f.read(sample))
    if size > sample:
      f.seek(max(sample, size - sample))
      h.update(f.read(sample))
  return h.hexdigest()
