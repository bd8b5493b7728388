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
When the hash split holds out nothing (a small corpus), one document (or the tail of the only one)
is held out instead, with a notice: see fmjax.data.holdout.

Binary files (NUL bytes or invalid UTF-8) among text/jsonl/parquet inputs are refused with one
DataError naming them, unless `data.skip_binary` is set: then they are left out with a warning
that lists them (also when a cached build is reused). The policy is part of the cache key, so a
build made with skip_binary=true is never reused without it, and a refused build writes nothing.
The stdlib corpus (a few Latin-1 test files) is decoded with U+FFFD replacements instead.
The `tfds` source (fmjax.data.tfds_source) reads any prepared TFDS dataset by name, as ArrayRecord.
`open_split(data_cfg, split)` hides which kind it is: a sequence of `str` documents; `describe`
names the source in use for messages.
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
from typing import Sequence

import grain

from fmjax.runtime import paths
from fmjax.data import corpora, formats, holdout, local_build, tfds_source
from fmjax.data.documents import DocumentReader, name_files, resolve_files
from fmjax.data.errors import DataError
from fmjax.data.records import TextSource

log = logging.getLogger(__name__)
LOCAL_SPLITS = local_build.SPLITS
_FORMAT_VERSION = '2.0.0'  # bump when the stored layout or document rules change
is_validation = local_build.is_validation


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


def _shards(directory: str, manifest: dict, split: str) -> TextSource:
  shards = manifest.get('shards', {}).get(split, [])
  if not shards:  # no document went into it
    return TextSource([], 'text')
  return TextSource(grain.sources.ArrayRecordDataSource([os.path.join(directory, s) for s in shards]), None)


def _local_split(data_cfg, split: str) -> Sequence[str]:
  if split not in LOCAL_SPLITS:
    raise DataError(f'split {split!r} does not exist for data.source={data_cfg.source!r}: '
                    f'local sources have {", ".join(LOCAL_SPLITS)}')
  directory = build_local(data_cfg)
  manifest = local_build.read_manifest(directory) or {}
  plan = holdout_plan(data_cfg, directory, manifest)
  if plan is None or not plan.holds_out:
    return _shards(directory, manifest, split)
  return holdout.SplitView(_shards(directory, manifest, 'train'), plan, split)


def holdout_plan(data_cfg, directory: str, manifest: dict) -> holdout.Plan | None:
  """The hold-out of a build whose hash split left validation empty (fmjax.data.holdout), else None:
  computed once per dataset directory (saved there) and announced once per process."""
  counts = manifest.get('counts', {})
  if data_cfg.get('eval_files') or _fraction(data_cfg) == 0 or counts.get('validation') or not counts.get('train'):
    return None
  plan = holdout.load(directory)
  if plan is None:
    reader = local_reader(data_cfg)
    plan = holdout.plan(_shards(directory, manifest, 'train'), _fraction(data_cfg),
                        lambda held, text: _file_of(reader, text))
    holdout.save(directory, plan)
  if directory not in _noticed:
    _noticed.add(directory)
    hash_split = (f'data.validation_fraction={_fraction(data_cfg):g} puts none of the {counts["train"]} documents '
                  f'of {describe(data_cfg)} in the validation split (a stable hash picks them)')
    if plan.holds_out:
      log.info('%s: holding out %s for validation instead', hash_split, plan.what)
    else:
      log.warning('%s, and none can be held out instead: %s', hash_split, plan.why_not)
  return plan


def _file_of(reader: DocumentReader, text: str) -> str:
  """The input file whose whole content is `text` (one document per file), relative to the files'
  folder (a cached build serves a moved corpus too), else ''."""
  if reader.kind != 'text' or reader.split_by != 'file':
    return ''
  size = len(text.encode('utf-8', errors='surrogatepass'))
  for path in reader.paths:
    if formats.compression_of(path) or paths.is_url(path) or paths.size(path) not in (size, size + 3):
      continue
    with open(path, 'rb') as f:
      raw = f.read()
    decoded = raw.decode('utf-8', errors='replace')
    if (decoded[1:] if decoded.startswith('\ufeff') else decoded) == text:
      return os.path.relpath(path, os.path.commonpath([os.path.dirname(p) for p in reader.paths]))
  return ''


def describe(data_cfg) -> str:
  """The source in use, in words, for messages: 'data.files=\'txt/*.txt\' (read as data.source=text)'."""
  if data_cfg.get('mixture'):
    return f'data.mixture={data_cfg.mixture!r}'
  resolved = with_source(data_cfg, quiet=True)
  source = resolved.source
  if source == 'tfds':
    return f'data.source=\'tfds\' (data.tfds_name={data_cfg.tfds_name!r})'
  if source == 'stdlib':
    return "data.source='stdlib' (the Python standard library's sources)"
  if resolved is not data_cfg:
    return f'data.files={data_cfg.files!r} (read as data.source={source})'
  return f'data.source={source!r} (data.files={data_cfg.files!r})'


def empty_eval_error(data_cfg, what: str = '') -> DataError:
  """The one-line error of an empty eval split, naming the source in use (`what`, else `describe`),
  why it is empty when known, and the fix."""
  cfg = with_source(data_cfg, quiet=True)
  what, split = what or describe(data_cfg), data_cfg.eval_split
  if cfg.source == 'tfds':
    return DataError(f'the eval split {split!r} of {what} is empty: set data.eval_split to a split with '
                     'examples (or set eval_every=0)')
  if cfg.get('eval_files'):
    return DataError(f'the eval split {split!r} of {what} is empty: data.eval_files={cfg.eval_files!r} holds no '
                     'text; point it at validation files with text (or set eval_every=0)')
  if _fraction(cfg) == 0:
    why = '; data.validation_fraction=0 holds out nothing'
  else:
    plan = holdout.load(build_local(cfg))
    why = f'; nothing is held out: {plan.why_not}' if plan is not None and plan.why_not else ''
  return DataError(f'the eval split {split!r} of {what} is empty: give validation files with '
                   f'data.eval_files=GLOB, or raise data.validation_fraction (or set eval_every=0){why}')


def with_source(data_cfg, quiet: bool = False):
  """data_cfg, or a copy whose source is named by data.files when it says 'stdlib' but files are given
  (`--config.data.files=input.txt` on a config that reads the stdlib corpus means those files)."""
  if data_cfg.source != 'stdlib' or not data_cfg.files:
    return data_cfg
  kind = formats.kind_of(data_cfg.files)
  if not quiet and data_cfg.files not in _noticed:
    _noticed.add(data_cfg.files)
    log.info('data.files is set: reading it as data.source=%s (not the stdlib corpus)', kind)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.source = kind
  return cfg


def open_split(data_cfg, split: str) -> TextSource:
  """The documents of one split as a random-access sequence of `str`, whatever the source."""
  data_cfg = with_source(data_cfg)
  if data_cfg.source == 'tfds':
    return tfds_source.open_split(data_cfg, split)
  return _local_split(data_cfg, split)
