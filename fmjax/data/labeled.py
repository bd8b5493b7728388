"""Labelled examples for fine-tuning: CSV / JSONL files, a TFDS dataset, or the embedded demo task.

Examples are small enough to hold in memory: `load_split` returns parallel lists of columns
(`text`, `label` for classification; `prompt`, `response` for prompt tuning). `encode_*` turns
them into fixed rows in the model batch format of `fmjax.data.batches`:

  classification  [bos] text [eos], truncated to seq_len; `targets` holds the class id on every
                  position and `weights` is 1 on the last real token only (1 per example)
  prompt tuning   [bos] prompt response [eos]; weights 1 only where the target is a response token

The demo task (`source='stdlib_packages'`): which standard-library package a code snippet comes
from. Files are assigned to train or eval by a stable hash, so no file feeds both.
"""

from __future__ import annotations

import csv
import io
import os
import zlib
from typing import Sequence

import numpy as np

from fmjax.data import batches as batches_lib
from fmjax.data import documents
from fmjax.data.documents import resolve_files
from fmjax.data.errors import DataError

SOURCES = ('csv', 'jsonl', 'tfds', 'stdlib_packages')


def _read_csv(path: str, columns: Sequence[str]) -> dict[str, list[str]]:
  reader = csv.DictReader(io.StringIO(documents.read_utf8(path), newline=''))
  header = reader.fieldnames or []
  for c in columns:
    if c not in header:
      raise DataError(f'{path}: no column {c!r}; its columns are {", ".join(header) or "(none)"}; '
                      'set finetune.text_feature / label_feature')
  rows = list(reader)
  return {c: [r[c] if r[c] is not None else '' for r in rows] for c in columns}


def _read_jsonl(path: str, columns: Sequence[str]) -> dict[str, list[str]]:
  out = {c: [] for c in columns}
  for n, record in documents.jsonl_records(documents.read_utf8(path), path):
    for c in columns:
      if c not in record:
        keys = ', '.join(record)
        raise DataError(f'{path}:{n}: no field {c!r} (it has {keys}); set finetune.text_feature / '
                        'label_feature')
      out[c].append(_as_text(record[c]))
  return out


def _as_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, (np.integer, np.floating)):
    value = value.item()
  return str(value)


def read_file(path: str, columns: Sequence[str], optional: Sequence[str] = ()) -> dict[str, list]:
  """Columns of one CSV or JSONL file (by extension: .csv, .jsonl/.json) as lists of strings.

  `optional` columns are read when every row has them, else they are lists of None.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.csv', '.jsonl', '.json'):
    raise DataError(f'{path}: unknown file type {ext or "(no extension)"!r}; use a .csv or .jsonl file')
  read = _read_csv if ext == '.csv' else _read_jsonl
  if optional:
    try:
      return read(path, tuple(columns) + tuple(optional))
    except DataError:   # an optional column missing (a missing required one fails again below)
      pass
  data = read(path, columns)
  n = len(data[columns[0]]) if columns else 0
  return {**data, **{c: [None] * n for c in optional}}


def read_files(source: str, pattern: str, columns: Sequence[str], what: str) -> dict[str, list[str]]:
  """The columns of every csv or jsonl (`source`) file a glob matches, concatenated in path order."""
  data = {c: [] for c in columns}
  read = _read_csv if source == 'csv' else _read_jsonl
  for path in resolve_files(pattern, what):
    for c, values in read(path, columns).items():
      data[c].extend(values)
  return data


def _read_tfds(ft, split: str, columns: Sequence[str]) -> dict[str, list[str]]:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if not ft.tfds_name:
    raise DataError("finetune.source='tfds' needs finetune.tfds_name")
  try:
    builder = tfds.builder(ft.tfds_name, data_dir=ft.tfds_data_dir or None)
  except Exception as e:  # noqa: BLE001 - TFDS raises several types for a missing dataset
    raise DataError(f'TFDS dataset {ft.tfds_name!r} not found: {str(e).strip().splitlines()[0]}') from None
  if not builder.is_prepared():
    raise DataError(f'TFDS dataset {ft.tfds_name!r} is not prepared in {builder.data_dir}; build it first')
  if split not in builder.info.splits:
    raise DataError(f'TFDS dataset {ft.tfds_name!r} has no split {split!r}; it has '
                    f'{", ".join(sorted(builder.info.splits))}')
  features = builder.info.features
  for c in columns:
    if c not in features:
      raise DataError(f'TFDS dataset {ft.tfds_name!r} has no feature {c!r}; it has '
                      f'{", ".join(sorted(features.keys()))}')
  names = {c: getattr(features[c], 'names', None) for c in columns}  # ClassLabel ids -> names
  source = builder.as_data_source(split=split)
  out = {c: [] for c in columns}
  for i in range(len(source)):
    record = source[i]
    for c in columns:
      v = record[c]
      out[c].append(names[c][int(v)] if names[c] else _as_text(v))
  return out


def stdlib_package_files(packages: Sequence[str]) -> dict[str, list[str]]:
  """The `.py` files of each named top-level standard-library package."""
  from fmjax.data.corpora import stdlib_dir, stdlib_files  # pylint: disable=import-outside-toplevel
  root = stdlib_dir()
  found = {p: [] for p in packages}
  for path in stdlib_files():
    top = os.path.relpath(path, root).split(os.sep)[0]
    if top in found:
      found[top].append(path)
  for p, files in found.items():
    if not files:
      raise DataError(f'no standard-library package {p!r} in {root}; change finetune.demo_packages')
  return found


def _snippets(text: str, size: int) -> list[str]:
  """Consecutive non-blank-starting blocks of whole lines, each about `size` characters."""
  out, cur = [], ''
  for line in text.splitlines(keepends=True):
    if len(cur) + len(line) > size and cur.strip():
      out.append(cur)
      cur = ''
    cur += line
  if len(cur.strip()) > size // 4:
    out.append(cur)
  return out


def _stdlib_packages(ft, split: str, size: int) -> dict[str, list[str]]:
  per_class = ft.demo_per_class if split == 'train' else max(ft.demo_per_class // 4, 1)
  texts, labels = [], []
  from fmjax.data.corpora import stdlib_dir  # pylint: disable=import-outside-toplevel
  for package, files in stdlib_package_files(ft.demo_packages).items():
    # A stable quarter of each package's files (at least one) is eval-only; the rest is train-only.
    ranked = sorted(files, key=lambda p: zlib.crc32(os.path.relpath(p, stdlib_dir()).encode()))
    n_eval = max(len(files) // 4, 1)
    pool = []
    for path in (ranked[n_eval:] if split == 'train' else ranked[:n_eval]):
      with open(path, encoding='utf-8', errors='replace') as f:
        pool.extend(_snippets(f.read(), size))
    rng = np.random.default_rng(zlib.crc32(f'{package}/{split}'.encode()))
    take = rng.permutation(len(pool))[:per_class]
    texts.extend(pool[i] for i in take)
    labels.extend([package] * len(take))
  return {'text': texts, 'label': labels}


def load_split(ft, split: str, columns: Sequence[str], snippet_chars: int = 256) -> dict[str, list[str]]:
  """Columns of one split ('train' or 'eval') as lists of strings; `columns` are finetune feature names."""
  if ft.source not in SOURCES:
    raise DataError(f'finetune.source={ft.source!r} is not one of {", ".join(SOURCES)}')
  if ft.source == 'stdlib_packages':
    data = _stdlib_packages(ft, split, snippet_chars)
    data = {c: data['text' if c == ft.text_feature else 'label'] for c in columns}
  elif ft.source == 'tfds':
    data = _read_tfds(ft, ft.train_split if split == 'train' else ft.eval_split, columns)
  else:
    pattern = ft.train_files if split == 'train' else ft.eval_files
    if not pattern:
      raise DataError(f'finetune.source={ft.source!r} needs finetune.{split}_files (a glob)')
    data = read_files(ft.source, pattern, columns, f'finetune.{split}_files')
  limit = ft.max_train_examples if split == 'train' else ft.max_eval_examples
  if limit:
    data = {c: v[:limit] for c, v in data.items()}
  if not data[columns[0]]:
    raise DataError(f'the {split} split of finetune.source={ft.source!r} has no examples; check the files/split')
  return data


def label_set(ft, train_labels: Sequence[str]) -> tuple[str, ...]:
  """The class names in id order: finetune.labels, or the sorted distinct train labels."""
  names = tuple(str(x) for x in ft.labels) or tuple(sorted(set(train_labels)))
  if len(names) < 2:
    raise DataError(f'classification needs at least 2 classes, found {list(names)}; check '
                    'finetune.label_feature or set finetune.labels')
  if len(set(names)) != len(names):
    raise DataError(f'finetune.labels has duplicates: {list(names)}')
  return names


def label_ids(labels: Sequence[str], names: Sequence[str], split: str) -> np.ndarray:
  """Class ids of the labels; a label outside the set is an error naming it."""
  index = {n: i for i, n in enumerate(names)}
  out = np.empty(len(labels), np.int32)
  for i, label in enumerate(labels):
    if label not in index:
      raise DataError(f'{split} example {i} has label {label!r}, which is not in the label set '
                      f'({", ".join(names)}); fix the data or finetune.labels')
    out[i] = index[label]
  return out


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def encode_classification(texts: Sequence[str], ids: np.ndarray, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """Rows [N, seq_len] of [bos] text [eos]; class id in `targets`, weight 1 on the last real token."""
  rows = []
  for text in texts:
    body = np.asarray(tokenizer.encode(text), np.int32)[:max(seq_len - 2, 0)]
    tokens = np.concatenate([[tokenizer.bos_id], body, [tokenizer.eos_id]]).astype(np.int32)
    rows.append(batches_lib.pad_row(tokens, seq_len + 1, tokenizer.pad_id))
  batch = batches_lib.model_batch(_stack(rows))
  n_real = (batch['segment_ids'] > 0).sum(1)
  weights = np.zeros_like(batch['weights'])
  weights[np.arange(len(texts)), np.maximum(n_real - 1, 0)] = 1.0
  batch['targets'] = np.repeat(np.asarray(ids, np.int32)[:, None], seq_len, axis=1)
  batch['weights'] = weights
  return batch


def encode_prompt_response(prompts: Sequence[str], responses: Sequence[str], tokenizer,
                           seq_len: int) -> dict[str, np.ndarray]:
  """Rows [N, seq_len] of [bos] prompt response [eos]; loss weight only on response (and eos) targets."""
  rows, prompt_lens = [], []
  for prompt, response in zip(prompts, responses):
    p = np.asarray(tokenizer.encode(prompt), np.int32)
    r = np.asarray(tokenizer.encode(response), np.int32)
    tokens = np.concatenate([[tokenizer.bos_id], p, r, [tokenizer.eos_id]]).astype(np.int32)
    rows.append(batches_lib.pad_row(tokens, seq_len + 1, tokenizer.pad_id))
    prompt_lens.append(1 + len(p))
  batch = batches_lib.model_batch(_stack(rows))
  target_index = np.arange(seq_len)[None, :] + 1          # position of each target in the row
  batch['weights'] = batch['weights'] * (target_index >= np.asarray(prompt_lens)[:, None])
  return batch


def pad_examples(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Append weight-0 rows so the example count is a multiple of `multiple`."""
  n = len(batch['inputs'])
  extra = (-n) % multiple
  if not extra:
    return batch
  return {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


class EpochBatches:
  """Endless batches of in-memory rows: a fresh permutation each epoch, a pure function of (seed, step).

  `start(step)` positions the iterator so that a resumed run sees the batches it would have seen.
  Each process takes its slice of every global batch.
  """

  def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.rows, self.global_batch, self.seed = rows, global_batch, seed
    self.n = len(rows['inputs'])
    if self.n == 0:
      raise DataError('no training examples')
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.step = 0
    self._cached = (-1, None)

  def start(self, step: int) -> 'EpochBatches':
    self.step = step
    return self

  def _order(self, epoch: int) -> np.ndarray:
    if self._cached[0] != epoch:
      self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
    return self._cached[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    first = self.step * self.global_batch + self.offset
    idx = np.empty(self.local, np.int64)
    for j in range(self.local):
      epoch, pos = divmod(first + j, self.n)
      idx[j] = self._order(epoch)[pos]
    self.step += 1
    return {k: v[idx] for k, v in self.rows.items()}
