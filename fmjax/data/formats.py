"""Input file formats: text, JSONL and Parquet, each plain or compressed (.gz, .zst), read as a stream.

`kind_of(path)` names the format a file name says (text | jsonl | parquet) and `compression_of`
its compression; `open_bytes` opens a file decompressed; `iter_lines` yields its raw lines (bytes,
one at a time: memory stays bounded by the longest line); `parquet_texts` yields one column's
strings batch by batch. Decoding and document rules live in fmjax.data.documents.
"""

from __future__ import annotations

import gzip
import io
import os
from typing import BinaryIO, Iterator

from fmjax.runtime import paths
from fmjax.data.errors import DataError

COMPRESSIONS = {'.gz': 'gzip', '.zst': 'zstd', '.zstd': 'zstd'}
_JSONL = ('.jsonl', '.ndjson', '.json')
_PARQUET = ('.parquet', '.pq')
_STRUCTURED = _JSONL + _PARQUET + ('.tar', '.zip', '.csv', '.tsv', '.arrow', '.arrayrecord', '.tfrecord')
_CHUNK = 1 << 20


def compression_of(path: str) -> str:
  """'gzip', 'zstd' or '' from the file name."""
  return COMPRESSIONS.get(os.path.splitext(path)[1].lower(), '')


def inner_name(path: str) -> str:
  """The file name without its compression suffix (data.jsonl.gz -> data.jsonl)."""
  stem, ext = os.path.splitext(path)
  return stem if ext.lower() in COMPRESSIONS else path


def kind_of(path: str) -> str:
  """text | jsonl | parquet, from the name (compression suffix ignored); unknown names are text."""
  ext = os.path.splitext(inner_name(path))[1].lower()
  if ext in _JSONL:
    return 'jsonl'
  if ext in _PARQUET:
    return 'parquet'
  return 'text'


def check_kind(path: str, source: str) -> None:
  """Refuse a file whose name says another format than data.source (one line naming the fix)."""
  inner_ext = os.path.splitext(inner_name(path))[1].lower()
  if source == 'text' and inner_ext in _STRUCTURED:
    found = kind_of(path)
    fix = f'set data.source={found}' if found != 'text' else 'unpack it first'
    packed = f'{compression_of(path)}-compressed ' if compression_of(path) else ''
    raise DataError(f'input {path} is a {packed}{inner_ext[1:]} file, not text: {fix} (data.source=text would '
                    'train on its raw bytes)')
  if source == 'parquet' and inner_ext not in _PARQUET:
    raise DataError(f'input {path} is not a .parquet file: narrow data.files or set data.source={kind_of(path)}')
  if source == 'jsonl' and inner_ext in _PARQUET:
    raise DataError(f'input {path} is a Parquet file: set data.source=parquet')


def _zstd_reader(raw: BinaryIO, path: str) -> BinaryIO:
  try:
    import zstandard  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f'{path} is zstd-compressed, which needs the zstandard package: pip install zstandard') from None
  return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK, closefd=True),
                           buffer_size=_CHUNK)


def open_bytes(path: str) -> BinaryIO:
  """The file's bytes, decompressed per its suffix; errors name the file."""
  try:
    raw = paths.open_file(path, 'rb')
  except OSError as e:
    raise DataError(f'cannot read input file {path}: {e.strerror or e}') from None
  compression = compression_of(path)
  if compression == 'gzip':
    stream = gzip.GzipFile(fileobj=raw, mode='rb')
    stream.myfileobj = raw   # closed with the stream, as gzip.open(filename) does
    return stream
  if compression == 'zstd':
    return _zstd_reader(raw, path)
  return raw


def read_all(path: str) -> bytes:
  """The whole (decompressed) content of a file."""
  with _guard(path), open_bytes(path) as f:
    return f.read()


def iter_lines(path: str) -> Iterator[bytes]:
  """The raw lines of a (decompressed) file, with their line ends; one line in memory at a time."""
  with _guard(path), open_bytes(path) as f:
    yield from f


class _guard:  # pylint: disable=invalid-name
  """Turns decompression/read errors inside the block into one-line DataErrors naming the file."""

  def __init__(self, path: str):
    self.path = path

  def __enter__(self):
    return self

  def __exit__(self, kind, value, tb):
    if value is None or isinstance(value, (DataError, GeneratorExit)):
      return False
    if isinstance(value, (OSError, EOFError)) or type(value).__module__.startswith('zstandard'):
      what = compression_of(self.path) or 'file'
      raise DataError(f'cannot read {self.path}: not a valid {what} stream or truncated ({value}); '
                      're-download it or leave it out of data.files') from None
    return False


def parquet_texts(path: str, column: str, batch_rows: int = 1024) -> Iterator[object]:
  """The values of one column of a Parquet file, `batch_rows` rows in memory at a time."""
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    pf = pq.ParquetFile(paths.open_file(path, 'rb') if paths.is_url(path) else path)
  except (OSError, pyarrow.ArrowException) as e:
    raise DataError(f'cannot read Parquet file {path}: {e}') from None
  names = pf.schema_arrow.names
  if column not in names:
    raise DataError(f'Parquet file {path} has no column {column!r}; set data.jsonl_field (the text field or '
                    f'column) to one of {", ".join(names[:10])}')
  try:
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
      yield from batch.column(0).to_pylist()
  except pyarrow.ArrowException as e:
    raise DataError(f'cannot read Parquet file {path}: {e}') from None

