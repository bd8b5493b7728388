"""Documents as TFDS ArrayRecord datasets, read by random access (no TensorFlow).

Local sources (stdlib, text, jsonl) are built once by fmjax's own `GeneratorBasedBuilder`
into `<cache_dir>/<kind>-<key>`, where key hashes the source kind, the sorted file paths,
their sizes and mtimes, and the options that shape documents or splits: a rebuild happens
only when an input changes. The build goes to a temporary directory that is renamed into
place, so concurrent builders (e.g. one per host) never see a partial dataset.
Each document goes to 'validation' when the SHA-1 of its UTF-8 text falls below
`validation_fraction`, else to 'train': stable across runs, machines and Python versions.

Binary files (NUL bytes or invalid UTF-8) among text/jsonl inputs are refused with one
DataError naming them, unless `data.skip_binary` is set: then they are left out with a warning
that lists them (also when a cached build is reused). The policy is part of the cache key, so a
build made with skip_binary=true is never reused without it, and a refused build writes nothing.
The stdlib corpus (a few Latin-1 test files) is decoded with U+FFFD replacements instead.
The `tfds` source reads any prepared TFDS dataset by name (+ data_dir): ArrayRecord directly,
TFRecord only through TensorFlow.
`open_split(data_cfg, split)` hides which kind it is: a sequence of `str` documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Sequence

import tensorflow_datasets as tfds

from fmjax.data import corpora
from fmjax.data.documents import DocumentReader, name_files, resolve_files
from fmjax.data.errors import DataError

log = logging.getLogger(__name__)
LOCAL_SPLITS = ('train', 'validation')
_FORMAT_VERSION = '1.0.0'  # bump when the stored layout or document rules change


def is_validation(text: str, fraction: float) -> bool:
  """Whether a document belongs to the validation split (stable hash of its text)."""
  digest = hashlib.sha1(text.encode('utf-8', errors='surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'big') < fraction * 2.0**64


def plan_splits(reader: DocumentReader, fraction: float) -> tuple[dict[str, list[int]], dict[str, int], list[str]]:
  """One pass over the inputs: per split, the files holding its documents and their count;
  and the paths of the binary files. Raises DataError on unreadable input."""
  files = {split: [] for split in LOCAL_SPLITS}
  counts = dict.fromkeys(LOCAL_SPLITS, 0)
  binary = []
  for index in range(len(reader.paths)):
    docs, is_binary = reader.file_documents(index)
    if is_binary:
      binary.append(reader.paths[index])
    splits = set()
    for _, text in docs:
      split = 'validation' if is_validation(text, fraction) else 'train'
      counts[split] += 1
      splits.add(split)
    for split in sorted(splits):
      files[split].append(index)
  return files, counts, binary


class FmjaxText(tfds.core.GeneratorBasedBuilder):
  """Local documents with one feature, `text`, split into train/validation by hash.

  `files` maps each non-empty split to the indices of the files holding its documents
  (see plan_splits): TFDS cannot write an empty split, and each pass reads only its files.
  """

  VERSION = tfds.core.Version(_FORMAT_VERSION)
  # No checksums/code files live next to this builder (TFDS' lookup needs importlib_resources).
  code_path = None

  def __init__(self, *, reader: DocumentReader | None = None, files: dict[str, list[int]] | None = None,
               validation_fraction: float = 0.0, **kwargs):
    self._reader, self._files, self._fraction = reader, files or {}, validation_fraction
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description='fmjax local documents',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split, files in self._files.items() if files}

  def _generate_examples(self, split: str = 'train'):
    for index in self._files[split]:
      for key, text in self._reader.file_documents(index)[0]:
        if is_validation(text, self._fraction) == (split == 'validation'):
          yield key, {'text': text}


class TextSource:
  """Random access to the text feature of a record source: `len(src)`, `src[i] -> str`."""

  def __init__(self, records: Sequence[Any], feature: str = 'text'):
    self._records = records
    self._feature = feature

  def __len__(self) -> int:
    return len(self._records)

  def _text(self, record) -> str:
    value = record[self._feature] if isinstance(record, dict) else record
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


def local_reader(data_cfg) -> DocumentReader:
  """The DocumentReader of a local source (stdlib | text | jsonl)."""
  source = data_cfg.source
  if source == 'stdlib':
    return DocumentReader(corpora.stdlib_files(), kind='text', split_by='file', binary_files='replace')
  if source in ('text', 'jsonl'):
    return DocumentReader(resolve_files(data_cfg.files), kind=source, split_by=data_cfg.split_by,
                          jsonl_field=data_cfg.jsonl_field,
                          binary_files='skip' if data_cfg.skip_binary else 'refuse')
  raise DataError(f'data.source={source!r} is not one of stdlib, text, jsonl, tfds')


def dataset_dir(data_cfg, reader: DocumentReader) -> str:
  """Where the built dataset of these inputs and options lives."""
  fraction = float(data_cfg.validation_fraction)
  if not 0.0 <= fraction < 1.0:
    raise DataError(f'data.validation_fraction={fraction} must be in [0, 1)')
  key = json.dumps([_FORMAT_VERSION, fraction, reader.fingerprint()])
  digest = hashlib.sha1(key.encode('utf-8')).hexdigest()[:16]
  cache_dir = os.path.expanduser(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
  return os.path.join(cache_dir, f'{data_cfg.source}-{digest}')


def _make_builder(data_dir: str, **kwargs) -> FmjaxText:
  return FmjaxText(data_dir=data_dir, file_format='array_record', **kwargs)


def check_binary(data_cfg, reader: DocumentReader, binary: list[str]) -> None:
  """Refuse binary inputs (one line naming them), or warn that they are skipped, per the reader's policy."""
  if not binary:
    return
  names = name_files(binary)
  if reader.binary_files == 'refuse':
    raise DataError(f'{len(binary)} of {len(reader.paths)} files matched by data.files={data_cfg.files!r} are '
                    f'binary (NUL bytes or not UTF-8): {names}; narrow the glob, convert them to UTF-8, or set '
                    'data.skip_binary=true to leave them out')
  if reader.binary_files == 'skip':
    log.warning('data.skip_binary: left out %d binary (NUL bytes or not UTF-8) of %d input files: %s',
                len(binary), len(reader.paths), names)
  else:
    log.warning('%d of %d input files are not valid UTF-8 text; invalid bytes were replaced by U+FFFD: %s',
                len(binary), len(reader.paths), names)


_SKIPPED_FILE = 'fmjax_binary_files.json'   # in a built dataset: the binary inputs it left out
_warned = set()                             # dataset dirs whose skipped files were reported in this process


def _warn_cached_skips(data_cfg, reader: DocumentReader, final: str) -> None:
  """On reuse of a cached build, repeat (once per process) the warning about the files it left out."""
  if final in _warned or reader.binary_files != 'skip':
    return
  _warned.add(final)
  try:
    with open(os.path.join(final, _SKIPPED_FILE)) as f:
      binary = json.load(f)
  except (OSError, ValueError):
    return
  check_binary(data_cfg, reader, binary)


def build_local(data_cfg) -> str:
  """Build the local source's dataset if needed; returns its directory."""
  reader = local_reader(data_cfg)
  final = dataset_dir(data_cfg, reader)
  if os.path.isdir(final):
    _warn_cached_skips(data_cfg, reader, final)
    return final
  fraction = float(data_cfg.validation_fraction)
  files, counts, binary = plan_splits(reader, fraction)
  check_binary(data_cfg, reader, binary)
  _warned.add(final)
  if not any(counts.values()):
    raise DataError(f'data.source={data_cfg.source!r} ({data_cfg.files or "stdlib"}) has no non-empty '
                    'documents: point data.files at files with text')
  parent = os.path.dirname(final)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + '.tmp-', dir=parent)
  except OSError as e:
    raise DataError(f'cannot write the dataset cache {parent}: {e.strerror}; set data.cache_dir') from None
  try:
    log.info('building %s dataset (%s documents) in %s', data_cfg.source, counts, final)
    builder = _make_builder(tmp, reader=reader, files=files, validation_fraction=fraction)
    was_active = tfds.core.utils.tqdm_utils._active  # pylint: disable=protected-access
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare()
    finally:
      tfds.display_progress_bar(was_active)
    with open(os.path.join(tmp, _SKIPPED_FILE), 'w') as f:
      json.dump(binary, f)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):  # else another process finished the same build first
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def _local_split(data_cfg, split: str) -> TextSource:
  if split not in LOCAL_SPLITS:
    raise DataError(f'split {split!r} does not exist for data.source={data_cfg.source!r}: '
                    f'local sources have {", ".join(LOCAL_SPLITS)}')
  builder = _make_builder(build_local(data_cfg))
  if split not in builder.info.splits:  # no document hashed into it
    return TextSource([], 'text')
  return TextSource(builder.as_data_source(split=split), 'text')


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def _tfds_split(data_cfg, split: str) -> TextSource:
  name, data_dir = data_cfg.tfds_name, data_cfg.tfds_data_dir or None
  if not name:
    raise DataError("data.source='tfds' needs data.tfds_name, e.g. 'c4/en:3.1.0'")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    where = data_dir or 'the default TFDS data_dir'
    first = str(e).strip().split('\n')[0]
    raise DataError(f'TFDS dataset {name!r} not found in {where}: check data.tfds_name and '
                    f'data.tfds_data_dir ({first})') from None
  if not builder.is_prepared():
    raise DataError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir}: build it first '
                    f'(tfds build {name.split(":")[0]} --data_dir=...) or fix data.tfds_data_dir')
  splits = builder.info.splits
  if split not in splits:
    raise DataError(f'TFDS dataset {name!r} has no split {split!r}; it has {", ".join(sorted(splits))}')
  features = builder.info.features
  if features is not None and data_cfg.text_feature not in features:
    raise DataError(f'TFDS dataset {name!r} has no feature {data_cfg.text_feature!r}; set data.text_feature '
                    f'to one of {", ".join(sorted(features.keys()))}')
  formats = {builder.info.file_format, *builder.info.alternative_file_formats}
  array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
  if array_record in formats:
    return TextSource(builder.as_data_source(split=split, file_format=array_record), data_cfg.text_feature)
  if not _tensorflow_available():
    raise DataError(f'TFDS dataset {name!r} is stored as {builder.info.file_format.value}, which needs '
                    "TensorFlow to read: pip install 'fmjax[tensorflow]' (or convert it to array_record)")
  # TFRecord is sequential: read the split once into memory (fine for small/eval datasets).
  ds = builder.as_dataset(split=split, shuffle_files=False)
  texts = [ex[data_cfg.text_feature] for ex in tfds.as_numpy(ds)]
  return TextSource(texts, data_cfg.text_feature)


def open_split(data_cfg, split: str) -> TextSource:
  """The documents of one split as a random-access sequence of `str`, whatever the source."""
  if data_cfg.source == 'tfds':
    return _tfds_split(data_cfg, split)
  return _local_split(data_cfg, split)
