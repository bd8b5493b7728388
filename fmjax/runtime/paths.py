"""One path layer for what a run reads and writes: local paths and URLs (gs://, s3://, ...).

Everything goes through etils.epath, the layer Orbax and TFDS already use, so a workdir, a checkpoint, a
tokenizer file or a data directory may be `gs://bucket/dir` wherever a local path is accepted. Local paths
keep the POSIX guarantees the run relies on (atomic replace, O_EXCL); on object stores a single object
write is atomic and exclusive creation uses the store's precondition (GCS `ifGenerationMatch=0`).
`gs://` needs gcsfs (the `gcs` extra); a missing backend is one line naming the extra.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import IO, Iterator

from fmjax.errors import UserError

_URL = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
_BACKENDS = {'gs': ('gcsfs', 'pip install "fmjax[gcs]"'), 's3': ('s3fs', 'pip install s3fs'),
             'az': ('adlfs', 'pip install adlfs')}


class PathError(UserError):
  """A path cannot be used: its scheme's backend is missing, or it does not exist."""


def scheme(path: str) -> str:
  """'gs' for gs://..., '' for a local path (file:// counts as local)."""
  m = _URL.match(str(path))
  return '' if m is None or m.group(1) == 'file' else m.group(1).lower()


def is_url(path) -> bool:
  """Whether `path` names remote storage (a URL with a scheme other than file://)."""
  return bool(scheme(os.fspath(path)))


def resolve(path: str) -> str:
  """A canonical form: local paths absolute with ~ expanded; URLs as given, without a trailing slash."""
  path = os.fspath(path)
  if path.startswith('file://'):
    path = path[len('file://'):]
  if is_url(path):
    return path.rstrip('/') if not path.endswith('://') else path
  return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  """`os.path.join` for local paths and URLs alike."""
  base = os.fspath(base)
  if not is_url(base):
    return os.path.join(base, *parts)
  return '/'.join([base.rstrip('/'), *(p.strip('/') for p in parts if p)])


def dirname(path: str) -> str:
  path = os.fspath(path)
  return path.rstrip('/').rsplit('/', 1)[0] if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return os.fspath(path).rstrip('/').rsplit('/', 1)[-1]


def epath_of(path):
  """The etils.epath.Path for `path` (checking that a URL's backend is installed)."""
  _check_backend(os.fspath(path))
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path)


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  with _storage_errors(path):
    return epath_of(path).exists()


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  with _storage_errors(path):
    return epath_of(path).is_dir()


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  with _storage_errors(path):
    return epath_of(path).is_file()


def listdir(path: str) -> list[str]:
  """Names in a directory; [] when it does not exist."""
  try:
    if not is_url(path):
      return os.listdir(path)
    with _storage_errors(path):
      return [basename(str(p)) for p in epath_of(path).iterdir()]
  except (FileNotFoundError, NotADirectoryError):
    return []


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """`os.walk` for local paths and URLs (top-down)."""
  if not is_url(path):
    yield from os.walk(path)
    return
  dirs, files = [], []
  for name in listdir(path):
    (dirs if isdir(join(path, name)) else files).append(name)
  yield path, dirs, files
  for d in dirs:
    yield from walk(join(path, d))


def glob(pattern: str) -> list[str]:
  """Sorted paths matching a glob (`**` recurses); URLs keep their scheme."""
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel
    return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))
  _check_backend(pattern)
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, _ = fsspec.core.url_to_fs(pattern)
  with _storage_errors(pattern):
    found = fs.glob(pattern)
  prefix = f'{scheme(pattern)}://'
  return sorted(p if is_url(p) else prefix + p for p in found)


def size(path: str) -> int:
  """A file's size in bytes."""
  if not is_url(path):
    return os.path.getsize(path)
  with _storage_errors(path):
    return int(epath_of(path).stat().length)


def makedirs(path: str) -> None:
  """Create a directory and its parents (object stores have no directories: nothing to do there)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = 'r') -> IO:
  """`open` (text is UTF-8). Remote files opened for writing appear whole when closed."""
  if not is_url(path):
    return open(path, mode, encoding=None if 'b' in mode else 'utf-8')  # noqa: SIM115 - the caller closes it
  return epath_of(path).open(mode)


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def read_bytes(path: str) -> bytes:
  with _storage_errors(path), open_file(path, 'rb') as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Write a whole file atomically: readers see the old content or the new, never a torn file."""
  write_bytes(path, text.encode('utf-8'))


def write_bytes(path: str, data: bytes) -> None:
  """Write a whole file atomically (local: tmp file, fsync, rename; remote: one object upload)."""
  if is_url(path):
    with _storage_errors(path):
      epath_of(path).write_bytes(data)
    return
  makedirs(os.path.dirname(path) or '.')
  tmp = f'{path}.tmp.{uuid.uuid4().hex[:8]}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def create_exclusive(path: str, data: bytes) -> bool:
  """Create `path` holding `data` only if it does not exist; False when it already does.

  Local: O_CREAT | O_EXCL. Object stores: a conditional upload (GCS ifGenerationMatch=0), through fsspec.
  """
  if not is_url(path):
    makedirs(os.path.dirname(path) or '.')
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    try:
      os.write(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    return True
  _check_backend(path)
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, target = fsspec.core.url_to_fs(path)
  try:
    with _storage_errors(path):
      fs.pipe_file(target, data, mode='create')
  except FileExistsError:
    return False
  except OSError as e:   # gcsfs reports a failed precondition as an HTTP 412 error
    if '412' in str(e) or 'precondition' in str(e).lower():
      return False
    raise
  return True


def remove(path: str) -> None:
  """Delete a file; nothing when it is already gone."""
  try:
    if not is_url(path):
      os.remove(path)
    else:
      with _storage_errors(path):
        epath_of(path).unlink()
  except FileNotFoundError:
    pass


def rmtree(path: str) -> None:
  """Delete a directory tree; nothing when it is already gone."""
  if exists(path):
    with _storage_errors(path):
      epath_of(path).rmtree()


def copy(src: str, dst: str) -> None:
  """Copy one file (any scheme to any scheme), atomically at the destination."""
  write_bytes(dst, read_bytes(src))


_STORAGE_LIBRARIES = ('gcsfs', 'fsspec', 'google', 'aiohttp', 's3fs', 'botocore', 'adlfs', 'azure')


@contextlib.contextmanager
def _storage_errors(path: str):
  """A storage library's own exception (gcsfs.HttpError, ...) becomes an OSError naming the path, so callers
  handle remote and local failures alike."""
  try:
    yield
  except OSError:
    raise
  except Exception as e:  # noqa: BLE001 - only the storage libraries' exceptions are converted
    if type(e).__module__.split('.')[0] not in _STORAGE_LIBRARIES:
      raise
    raise OSError(f'{path}: {type(e).__name__}: {e}') from e


def _check_backend(path: str) -> None:
  """One line naming the extra to install when a URL's filesystem package is missing."""
  s = scheme(path)
  if s not in _BACKENDS:
    return
  module, install = _BACKENDS[s]
  try:
    __import__(module)
  except ImportError:
    raise PathError(f'{path}: {s}:// paths need the {module} package: {install}') from None
