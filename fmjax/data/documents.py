"""Local files -> documents: glob resolution, decoding, and splitting into documents.

A `DocumentReader` is the recipe for one local corpus (file list + how to cut documents);
`file_documents(i)` gives the `(key, text)` documents of file i. Whitespace-only documents
are dropped. A file holding NUL bytes or invalid UTF-8 is "binary": `file_documents` reports
it, and the caller refuses or skips it (see fmjax.data.builders).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import stat
from typing import Iterator

from fmjax.data.errors import DataError

_PARAGRAPH_BREAK = re.compile(r'\n[ \t\r\f\v]*\n')


def resolve_files(pattern: str, what: str = 'data.files') -> list[str]:
  """Sorted absolute paths matched by a glob (`**` recurses); each must be a readable file."""
  if not pattern:
    raise DataError(f'{what} is empty: set it to a glob of input files, e.g. "corpus/*.txt"')
  paths = sorted({os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)})
  if not paths:
    raise DataError(f'{what}={pattern!r} matches no files: check the path/glob')
  for path in paths:
    check_readable(path)
  return paths


def check_readable(path: str) -> os.stat_result:
  """The file's stat, or DataError if it is missing (e.g. a broken link), not a file, or unreadable."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise DataError(f'cannot read input file {path}: {e.strerror} (broken link or removed file?)') from None
  if not stat.S_ISREG(st.st_mode):
    raise DataError(f'input {path} is not a regular file: narrow the glob to match files only')
  if not os.access(path, os.R_OK):
    raise DataError(f'input file {path} is not readable: fix its permissions')
  return st


def read_utf8(path: str, what: str = 'file') -> str:
  """A whole UTF-8 text file (a leading BOM dropped); unreadable, binary (NUL bytes) or non-UTF-8
  content is a one-line DataError naming the file and the first bad byte."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'cannot read {what} {path}: {e.strerror}') from None
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


def read_text(path: str) -> tuple[str, bool]:
  """The file decoded as UTF-8 (bad bytes replaced) and whether it is binary (NUL bytes or invalid UTF-8)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'cannot read input file {path}: {e.strerror}') from None
  try:
    return data.decode('utf-8'), b'\0' in data
  except UnicodeDecodeError:
    return data.decode('utf-8', errors='replace'), True


def name_files(paths: list[str], limit: int = 3) -> str:
  """'a, b, c and 4 more': the first `limit` paths and how many others."""
  shown = ', '.join(paths[:limit])
  return shown if len(paths) <= limit else f'{shown} and {len(paths) - limit} more'


def split_paragraphs(text: str) -> list[str]:
  """Blank-line-separated paragraphs of a text, without their surrounding newlines."""
  return [p.strip('\n') for p in _PARAGRAPH_BREAK.split(text)]


def jsonl_records(text: str, path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-blank line of JSONL text: the one JSONL reader of fmjax
  (pretraining documents and fine-tuning examples); a bad line is a one-line DataError."""
  for lineno, line in enumerate(text.split('\n'), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object') from None
    if not isinstance(record, dict):
      raise DataError(f'{path}:{lineno}: a JSON {type(record).__name__}, not an object; each line must be one '
                      'JSON object')
    yield lineno, record


def jsonl_texts(text: str, path: str, field: str) -> Iterator[str]:
  """The `field` string of each JSON line (blank lines skipped)."""
  for lineno, record in jsonl_records(text, path):
    if field not in record:
      raise DataError(f'{path}:{lineno}: no field {field!r}; set data.jsonl_field to the text field')
    value = record[field]
    if not isinstance(value, str):
      raise DataError(f'{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string')
    yield value


@dataclasses.dataclass
class DocumentReader:
  """The documents of local files. kind: text | jsonl; split_by: file | paragraph (text only);
  binary_files: refuse | skip (no documents, reported) | replace (decoded with U+FFFD)."""
  paths: list[str]
  kind: str = 'text'
  split_by: str = 'file'
  jsonl_field: str = 'text'
  binary_files: str = 'refuse'

  def file_documents(self, index: int) -> tuple[list[tuple[str, str]], bool]:
    """The non-blank (key, text) documents of file `index`, and whether the file is binary.

    A binary file's documents are not parsed (JSON lines of a binary file would fail first).
    """
    path = self.paths[index]
    text, binary = read_text(path)
    if binary and self.binary_files != 'replace':
      return [], True
    if self.kind == 'jsonl':
      texts = jsonl_texts(text, path, self.jsonl_field)
    elif self.split_by == 'paragraph':
      texts = split_paragraphs(text)
    else:
      texts = [text]
    return [(f'{index:08d}-{j:08d}', doc) for j, doc in enumerate(texts) if doc.strip()], binary

  def fingerprint(self) -> list:
    """What identifies the inputs: paths, sizes, mtimes and the options that shape documents."""
    files = []
    for path in self.paths:
      st = check_readable(path)
      files.append((path, st.st_size, st.st_mtime_ns))
    return [self.kind, self.split_by if self.kind == 'text' else '',
            self.jsonl_field if self.kind == 'jsonl' else '', self.binary_files, files]
