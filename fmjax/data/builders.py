"""Documents as ArrayRecord datasets, read by random access (no TensorFlow).

Local sources (stdlib, text, jsonl, parquet; plain or .gz/.zst compressed) are built once into
`<cache_dir>/<source>-<key>` by fmjax.data.local_build: one streaming pass per file, bounded
memory, groups of files in parallel processes. The key hashes the source kind, each file's path
relative to the corpus folder, size and a sample of its content, and the options that shape
documents or splits: a rebuild happens only when an input changes (not when the corpus moves).
One process builds while others (e.g. other hosts sharing the cache dir) wait on a lock file;
the build goes to a temporary directory renamed into place, so no reader sees a partial dataset.
Builds of the same corpus that were not used for `STALE_SECONDS` are removed after a new build.

Each document goes to 'validation' when the SHA-1 of its UTF-8 text falls below
`validation_fraction`, else to 'train': stable across runs, machines and Python versions. With
`data.eval_files`, those files are the validation split and every document of data.files trains.
A single text file with split_by=file (nanoGPT's input.txt) is cut into paragraphs, with a notice.

Binary files (NUL bytes or invalid UTF-8) among text/jsonl/parquet inputs are refused with one
DataError naming them, unless `data.skip_binary` is set: then they are left out with a warning
that lists them (also when a cached build is reused). The policy is part of the cache key, so a
build made with skip_binary=true is never reused without it, and a refused build writes nothing.
The stdlib corpus (a few Latin-1 test files) is decoded with U+FFFD replacements instead.
The `tfds` source reads any prepared TFDS dataset by name (+ data_dir) stored as ArrayRecord.
`open_split(data_cfg, split)` hides which kind it is: a sequence of `str` documents.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Sequence

import grain
import tensorflow_datasets as tfds

from fmjax.runtime import paths
from fmjax.data import corpora, formats, local_build
from fmjax.data.documents import DocumentReader, name_files, resolve_files
from fmjax.data.errors import DataError

log = logging.getLogger(__name__)
LOCAL_SPLITS = local_build.SPLITS
_FORMAT_VERSION = '2.0.0'  # bump when the stored layout or document rules change
is_validation = local_build.is_validation


class TextSource:
  """Random access to the text feature of a record source: `len(src)`, `src[i] -> str`."""

  def __init__(self, records: Sequence[Any], feature: str | None = 'text'):
    self._records = records
    self._feature = feature

  def __len__(self) -> int:
    return len(self._records)

  def _text(self, record) -> str:
    value = record[self._feature] if self._feature is not None and isinstance(record, dict) else record
    if isinstance(value, bytes):
      return value.decode('utf-8', errors='replace')
    return str(value)

  def __getitem__(self, index: int) -> str:
    return self._text(self._records[index])

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    getitems = getattr(self._records, '__getitems__', None)
    records = getitems(indices) if getitems else [self._records[i] for i in indices]
    return [self._text(r) for r in records]

  def __repr__(self) -> str:
    return f'TextSource({self._records!r}, feature={self._feature!r})'


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'fmjax', 'tfds')


LOCAL_SOURCES = ('stdlib', 'text', 'jsonl', 'parquet')
STALE_SECONDS = 24 * 3600      # builds of the same corpus unused this long are removed after a new build
_noticed = set()               # single-file notices given in this process


def _reader(data_cfg, pattern: str, what: str) -> DocumentReader:
  source = data_cfg.source
  if source not in LOCAL_SOURCES[1:]:
    raise DataError(f'data.source={source!r} is not one of {", ".join(LOCAL_SOURCES)}, tfds')
  files = resolve_files(pattern, what)
  for path in files:
    formats.check_kind(path, source)
  return DocumentReader(files, kind=source, split_by=data_cfg.split_by, jsonl_field=data_cfg.jsonl_field,
                        binary_files='skip' if data_cfg.skip_binary else 'refuse')


def local_reader(data_cfg) -> DocumentReader:
  """The DocumentReader of a local source's data.files (stdlib | text | jsonl | parquet)."""
  if data_cfg.source == 'stdlib':
    return DocumentReader(corpora.stdlib_files(), kind='text', split_by='file', binary_files='replace')
  reader = _reader(data_cfg, data_cfg.files, 'data.files')
  single = len(reader.paths) == 1 and reader.kind == 'text' and reader.split_by == 'file'
  if single and not data_cfg.get('eval_files') and float(data_cfg.validation_fraction) > 0:
    reader.split_by = 'paragraph'
    if reader.paths[0] not in _noticed:
      _noticed.add(reader.paths[0])
      log.info('data.files is one text file: its paragraphs are the documents, %g of them held out for '
               'validation (set data.eval_files or data.split_by=paragraph to choose)',
               float(data_cfg.validation_fraction))
  return reader


def eval_reader(data_cfg) -> DocumentReader | None:
  """The reader of data.eval_files (the validation split), or None."""
  pattern = data_cfg.get('eval_files', '')
  if not pattern or data_cfg.source == 'stdlib':
    return None
  return _reader(data_cfg, pattern, 'data.eval_files')


def _fraction(data_cfg) -> float:
  fraction = float(data_cfg.validation_fraction)
  if not 0.0 <= fraction < 1.0:
    raise DataError(f'data.validation_fraction={fraction} must be in [0, 1)')
  return fraction


def dataset_dir(data_cfg, reader: DocumentReader, evals: DocumentReader | None = None) -> str:
  """Where the built dataset of these inputs and options lives."""
  fraction = _fraction(data_cfg) if evals is None else 'eval_files'
  key = json.dumps([_FORMAT_VERSION, fraction, reader.fingerprint(), evals.fingerprint() if evals else None])
  digest = hashlib.sha1(key.encode('utf-8')).hexdigest()[:16]
  cache_dir = os.path.expanduser(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
  return os.path.join(cache_dir, f'{data_cfg.source}-{digest}')


def check_binary(data_cfg, reader: DocumentReader, binary: list[str], what: str = 'data.files') -> None:
  """Refuse binary inputs (one line naming them), or warn that they are skipped, per the reader's policy."""
  if not binary:
    return
  names = name_files(binary)
  if reader.binary_files == 'refuse':
    raise DataError(f'{len(binary)} of {len(reader.paths)} files matched by {what}={data_cfg.get(what[5:], "")!r} '
                    f'are binary (NUL bytes or not UTF-8): {names}; narrow the glob, convert them to UTF-8, or set '
                    'data.skip_binary=true to leave them out')
  if reader.binary_files == 'skip':
    log.warning('data.skip_binary: left out %d binary (NUL bytes or not UTF-8) of %d input files: %s',
                len(binary), len(reader.paths), names)
  else:
    log.warning('%d of %d input files are not valid UTF-8 text; invalid bytes were replaced by U+FFFD: %s',
                len(binary), len(reader.paths), names)


_warned = set()                             # dataset dirs whose skipped files were reported in this process


def _warn_cached_skips(data_cfg, reader: DocumentReader, final: str) -> None:
  """On reuse of a cached build, repeat (once per process) the warning about the files it left out."""
  if final in _warned or reader.binary_files != 'skip':
    return
  _warned.add(final)
  manifest = local_build.read_manifest(final) or {}
  check_binary(data_cfg, reader, manifest.get('binary', []))


def _identity(data_cfg) -> list:
  """What names a corpus across its versions (for removing stale builds of it)."""
  return [data_cfg.source, data_cfg.files, data_cfg.get('eval_files', '')]


def _build(data_cfg, reader: DocumentReader, evals: DocumentReader | None, tmp: str) -> dict:
  fraction = _fraction(data_cfg)
  tasks = local_build.plan_tasks(reader, 'hash' if evals is None else 'train', fraction, tmp, 0)
  if evals is not None:
    tasks += local_build.plan_tasks(evals, 'validation', 0.0, tmp, len(tasks))
  total = sum(paths.size(p) for r in (reader, evals) if r for p in r.paths)
  results = local_build.run_tasks(tasks, total)
  n_train = sum(1 for t in tasks if t.reader is reader)
  train, val = local_build.merge_results(results[:n_train]), local_build.merge_results(results[n_train:])
  check_binary(data_cfg, reader, train['binary'] if reader.binary_files != 'replace' else train['replaced'])
  if evals is not None:
    check_binary(data_cfg, evals, val['binary'], 'data.eval_files')
  merged = local_build.merge_results(results)
  merged['identity'] = _identity(data_cfg)
  return merged


def build_local(data_cfg) -> str:
  """Build the local source's dataset if needed (one process at a time per cache dir); its directory."""
  reader, evals = local_reader(data_cfg), eval_reader(data_cfg)
  final = dataset_dir(data_cfg, reader, evals)
  if os.path.isdir(final):
    _warn_cached_skips(data_cfg, reader, final)
    _touch(final)
    return final
  parent = os.path.dirname(final)
  created = not os.path.isdir(parent)
  try:
    os.makedirs(parent, exist_ok=True)
    lock = open(final + '.lock', 'a+')  # pylint: disable=consider-using-with
  except OSError as e:
    raise DataError(f'cannot write the dataset cache {parent}: {e.strerror}; set data.cache_dir') from None
  try:
    with lock:
      fcntl.flock(lock, fcntl.LOCK_EX)   # another process (or host) may be building it: wait for it
      if not os.path.isdir(final):
        _build_into(data_cfg, reader, evals, final)
      else:
        _warn_cached_skips(data_cfg, reader, final)
  finally:
    _remove_quietly(final + '.lock')   # only after `final` exists or the build failed
    if created and not os.path.isdir(final):
      _remove_quietly(parent, os.rmdir)  # a refused build leaves nothing behind
  _remove_stale(final, _identity(data_cfg))
  return final


def _build_into(data_cfg, reader: DocumentReader, evals: DocumentReader | None, final: str) -> None:
  _warned.add(final)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + '.tmp-', dir=os.path.dirname(final))
  try:
    log.info('building the %s dataset of %d files in %s', data_cfg.source, len(reader.paths), final)
    started = time.perf_counter()
    manifest = _build(data_cfg, reader, evals, tmp)
    if not any(manifest['counts'].values()):
      raise DataError(f'data.source={data_cfg.source!r} ({data_cfg.files or "stdlib"}) has no non-empty '
                      'documents: point data.files at files with text')
    local_build.write_manifest(tmp, manifest)
    os.rename(tmp, final)
    log.info('built %s: %s documents in %.1fs', final, manifest['counts'], time.perf_counter() - started)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _remove_quietly(path: str, remove=os.remove) -> None:
  try:
    remove(path)
  except OSError:
    pass


def _touch(directory: str) -> None:
  try:
    os.utime(os.path.join(directory, local_build.MANIFEST))
  except OSError:
    pass


def _remove_stale(final: str, identity: list) -> None:
  """Remove other builds of the same corpus whose manifest was not used for STALE_SECONDS."""
  parent, now = os.path.dirname(final), time.time()
  for name in os.listdir(parent):
    other = os.path.join(parent, name)
    if other == final or '.' in name or not os.path.isdir(other):
      continue
    manifest = local_build.read_manifest(other)
    if not manifest or manifest.get('identity') != identity:
      continue
    if now - os.path.getmtime(os.path.join(other, local_build.MANIFEST)) > STALE_SECONDS:
      log.info('removing %s: an older build of the same corpus, unused for a day', other)
      shutil.rmtree(other, ignore_errors=True)


def _local_split(data_cfg, split: str) -> TextSource:
  if split not in LOCAL_SPLITS:
    raise DataError(f'split {split!r} does not exist for data.source={data_cfg.source!r}: '
                    f'local sources have {", ".join(LOCAL_SPLITS)}')
  directory = build_local(data_cfg)
  shards = (local_build.read_manifest(directory) or {}).get('shards', {}).get(split, [])
  if not shards:  # no document went into it
    return TextSource([], 'text')
  return TextSource(grain.sources.ArrayRecordDataSource([os.path.join(directory, s) for s in shards]), None)


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def _build_command(name: str, data_dir: str | None) -> str:
  """The exact command that prepares a TFDS dataset as ArrayRecord."""
  base, _, version = name.partition(':')
  where = f' --data_dir={data_dir}' if data_dir else ''
  pinned = f' --version={version}' if version else ''
  return f'tfds build {base}{pinned}{where} --file_format=array_record'


def _prepared_dir(name: str, data_dir: str | None) -> str | None:
  """The folder of a prepared dataset named 'name[/config][:version]' under data_dir, if there is one."""
  base, _, version = name.partition(':')
  root = os.path.join(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR), base)
  if version:
    path = os.path.join(root, version)
    return path if os.path.isfile(os.path.join(path, 'dataset_info.json')) else None
  versions = sorted(v for v in (os.listdir(root) if os.path.isdir(root) else [])
                    if os.path.isfile(os.path.join(root, v, 'dataset_info.json')))
  return os.path.join(root, versions[-1]) if versions else None


def _tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder of a dataset: by registered name, else from its prepared folder (datasets whose
  builder code needs TensorFlow are still readable when prepared as ArrayRecord)."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError, ImportError) as e:
    prepared = _prepared_dir(name, data_dir)
    if prepared:
      return tfds.builder_from_directory(prepared)
    where = data_dir or 'the default TFDS data_dir'
    first = str(e).strip().split('\n')[0]
    if isinstance(e, ImportError) or 'tensorflow' in first.lower():
      raise DataError(f'TFDS dataset {name!r} is not prepared in {where} and its builder needs TensorFlow: '
                      f"prepare it where TensorFlow is installed ({_build_command(name, data_dir)}) "
                      'or fix data.tfds_data_dir') from None
    raise DataError(f'TFDS dataset {name!r} not found in {where}: check data.tfds_name and '
                    f'data.tfds_data_dir ({first})') from None


def _tfds_split(data_cfg, split: str) -> TextSource:
  name, data_dir = data_cfg.tfds_name, data_cfg.tfds_data_dir or None
  if not name:
    raise DataError("data.source='tfds' needs data.tfds_name, e.g. 'c4/en:3.1.0'")
  builder = _tfds_builder(name, data_dir)
  if not builder.is_prepared():
    raise DataError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir}: prepare it with '
                    f'`{_build_command(name, data_dir)}` or fix data.tfds_data_dir')
  splits = builder.info.splits
  if split not in splits:
    raise DataError(f'TFDS dataset {name!r} has no split {split!r}; it has {", ".join(sorted(splits))}')
  features = builder.info.features
  if features is not None and data_cfg.text_feature not in features:
    raise DataError(f'TFDS dataset {name!r} has no feature {data_cfg.text_feature!r}; set data.text_feature '
                    f'to one of {", ".join(sorted(features.keys()))}')
  formats_ = {builder.info.file_format, *builder.info.alternative_file_formats}
  array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
  if array_record in formats_:
    return TextSource(builder.as_data_source(split=split, file_format=array_record), data_cfg.text_feature)
  # TFRecord is sequential: random access (shuffling, sharding per host, resumable state) needs ArrayRecord.
  needs_tf = '' if _tensorflow_available() else " (TensorFlow is needed for that: pip install 'fmjax[tensorflow]')"
  convert = f'tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record'
  raise DataError(f'TFDS dataset {name!r} is stored as {builder.info.file_format.value}, which cannot be read '
                  f'by random access (shuffled, sharded per host, resumable): convert it once with `{convert}`'
                  f'{needs_tf}')


def with_source(data_cfg):
  """data_cfg, or a copy whose source is named by data.files when it says 'stdlib' but files are given
  (`--config.data.files=input.txt` on a config that reads the stdlib corpus means those files)."""
  if data_cfg.source != 'stdlib' or not data_cfg.files:
    return data_cfg
  kind = formats.kind_of(data_cfg.files)
  if data_cfg.files not in _noticed:
    _noticed.add(data_cfg.files)
    log.info('data.files is set: reading it as data.source=%s (not the stdlib corpus)', kind)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.source = kind
  return cfg


def open_split(data_cfg, split: str) -> TextSource:
  """The documents of one split as a random-access sequence of `str`, whatever the source."""
  data_cfg = with_source(data_cfg)
  if data_cfg.source == 'tfds':
    return _tfds_split(data_cfg, split)
  return _local_split(data_cfg, split)
