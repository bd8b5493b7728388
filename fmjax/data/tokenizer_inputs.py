"""Documents for training a tokenizer, from the same sources as pretraining (tools/train_tokenizer.py).

`sample_documents` reads text / JSONL / Parquet files (plain or .gz/.zst, see fmjax.data.formats)
or a `data.mixture`-style string, and samples by document: files in a seeded order, at most an even
share of `max_documents` from each file (by weight for a mixture). `training_lines` cuts documents
into the lines SentencePiece trains on, splitting lines longer than its limit at whitespace
instead of letting SentencePiece skip them silently, and counts what it split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterable, Iterator

from fmjax.data import formats, mixture
from fmjax.data.documents import BinaryInput, DocumentReader, resolve_files
from fmjax.data.errors import DataError

MAX_LINE_BYTES = 16384   # SentencePiece's max_sentence_length as fmjax trains it


@dataclasses.dataclass
class LineStats:
  """What training_lines did: lines yielded, long lines split, and the pieces they became."""
  lines: int = 0
  split_lines: int = 0
  pieces: int = 0
  documents: int = 0


def _reader(pattern: str, kind: str, field: str, split_by: str, what: str) -> DocumentReader:
  paths = resolve_files(pattern, what)
  kinds = {formats.kind_of(p) for p in paths} if kind == 'auto' else {kind}
  if len(kinds) > 1:
    raise DataError(f'{what}={pattern!r} matches files of several kinds ({", ".join(sorted(kinds))}): narrow it '
                    'or use one --mixture entry per kind')
  kind = kinds.pop()
  for path in paths:
    formats.check_kind(path, kind)
  return DocumentReader(paths, kind=kind, split_by=split_by, jsonl_field=field)


def _seeded_order(paths: list[str], seed: int) -> list[int]:
  key = lambda i: hashlib.sha1(f'{seed}:{paths[i]}'.encode()).digest()
  return sorted(range(len(paths)), key=key)


def _from_reader(reader: DocumentReader, limit: int, seed: int) -> Iterator[str]:
  """Up to `limit` documents (0 = all), an even share from each file, files in a seeded order."""
  per_file = math.ceil(limit / len(reader.paths)) if limit else 0
  for index in _seeded_order(reader.paths, seed):
    taken = 0
    try:
      for text in reader.iter_texts(index):
        if not text.strip():
          continue
        yield text
        taken += 1
        if per_file and taken >= per_file:
          break
    except BinaryInput as e:
      raise DataError(f'tokenizer input {e.path} is binary (NUL bytes or not UTF-8): narrow the glob') from None


def sample_documents(inputs: str, *, kind: str = 'auto', field: str = 'text', split_by: str = 'file',
                     max_documents: int = 0, seed: int = 0, is_mixture: bool = False) -> Iterator[str]:
  """Documents of a glob (kind auto: from each file's name) or of a mixture string (by weight)."""
  if not is_mixture:
    yield from _from_reader(_reader(inputs, kind, field, split_by, '--input'), max_documents, seed)
    return
  sources = mixture.parse(inputs)
  if any(s.kind in ('tfds', 'stdlib') for s in sources):
    raise DataError('tokenizer training reads local files: give globs in --mixture, not tfds:/stdlib sources')
  total = sum(s.weight for s in sources)
  for src in sources:
    share = max(1, round(max_documents * src.weight / total)) if max_documents else 0
    yield from _from_reader(_reader(src.spec, src.kind, field, split_by, f'--mixture source {src.name!r}'),
                            share, seed)


def _split_long(line: str, limit: int) -> list[str]:
  """Pieces of at most `limit` UTF-8 bytes, cut after whitespace where there is some."""
  pieces, rest = [], line
  while len(rest.encode('utf-8')) > limit:
    head = rest.encode('utf-8')[:limit].decode('utf-8', errors='ignore')
    cut = max(head.rfind(' '), head.rfind('\t'))
    cut = cut + 1 if cut > len(head) // 2 else len(head)
    pieces.append(rest[:cut])
    rest = rest[cut:]
  return pieces + ([rest] if rest else [])


def training_lines(documents: Iterable[str], stats: LineStats, limit: int = MAX_LINE_BYTES) -> Iterator[str]:
  """The non-blank lines of the documents; lines over `limit` bytes split (counted in `stats`)."""
  for doc in documents:
    stats.documents += 1
    for line in doc.split('\n'):
      if not line.strip():
        continue
      if len(line) * 4 > limit and len(line.encode('utf-8')) > limit:
        pieces = _split_long(line, limit)
        stats.split_lines += 1
        stats.pieces += len(pieces)
        stats.lines += len(pieces)
        yield from pieces
      else:
        stats.lines += 1
        yield line
