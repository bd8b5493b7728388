"""The `tfds` source: any prepared TFDS dataset, by name (+ data_dir), stored as ArrayRecord.

Datasets whose builder code needs TensorFlow are still readable when prepared (found by folder);
TFRecord-only datasets are refused with the command that converts them (random access is needed
for shuffling, sharding per host and resumable state).
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from fmjax.data.errors import DataError
from fmjax.data.records import TextSource


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


def open_split(data_cfg, split: str) -> TextSource:
  """The documents of a split of data.tfds_name (prepared as ArrayRecord), as a sequence of `str`."""
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
