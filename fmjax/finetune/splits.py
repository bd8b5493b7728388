"""The labelled splits of a fine-tuning run: train, validation (chooses the best checkpoint) and eval.

Validation comes from `finetune.validation_files` (csv/jsonl, a glob) or is held out of the train
split (`finetune.validation_fraction`): per label, the distinct texts ranked by a stable hash of the
text, the first share of them held out. The choice depends on neither the order of the examples nor
the other labels' examples, and copies of one text always land on the same side.

When that holds out nothing (every label's examples are copies of one text, e.g. 40 examples of a
few repeated texts), examples are held out instead (`hold_out_by_example`): per label, the share of
examples of lowest hash of the whole example, with a one-line notice. Those examples repeat train
texts, so validation then measures fit rather than generalisation; it still chooses the checkpoint
and the eval split stays unseen (choosing on the eval split would bias the reported metrics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Sequence

import numpy as np

from fmjax.data import labeled
from fmjax.data.errors import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Split:
  """One split's examples: texts (classify) or prompts/responses (prompt), labels and class ids."""
  columns: dict[str, list[str]]
  ids: np.ndarray | None = None   # classify: class id per example

  def __len__(self) -> int:
    return len(next(iter(self.columns.values())))

  def take(self, index: Sequence[int]) -> 'Split':
    index = list(index)
    cols = {c: [v[i] for i in index] for c, v in self.columns.items()}
    return Split(cols, None if self.ids is None else self.ids[np.asarray(index, np.int64)])


@dataclasses.dataclass
class LabeledData:
  """Train, validation (None when off) and eval splits, and the class names (classify)."""
  train: Split
  validation: Split | None
  eval: Split
  class_names: tuple[str, ...] = ()
  validation_from: str = ''       # 'files' | 'held out of train' | ''


def text_rank(text: str) -> int:
  """A stable 64-bit hash of a text (the same in every process, Python version and run)."""
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8', errors='replace'), digest_size=8).digest(), 'big')


def hold_out(texts: Sequence[str], labels: Sequence, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices): per label, the round(fraction * distinct texts) texts of lowest
  `text_rank` (at least one when the label has two or more distinct texts) are held out, all their copies."""
  if not 0 < fraction < 1:
    raise DataError(f'finetune.validation_fraction={fraction} must be in [0, 1)')
  by_label: dict = {}
  for i, (text, label) in enumerate(zip(texts, labels)):
    by_label.setdefault(label, {}).setdefault(text, []).append(i)
  held = []
  for groups in by_label.values():
    distinct = sorted(groups, key=lambda t: (text_rank(t), t))
    k = min(max(int(round(fraction * len(distinct))), 1), len(distinct) - 1)
    for text in distinct[:k]:
      held.extend(groups[text])
  mask = np.zeros(len(texts), bool)
  mask[held] = True
  return np.flatnonzero(~mask), np.flatnonzero(mask)


def hold_out_by_example(columns: Sequence[Sequence[str]], labels: Sequence,
                        fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices) by example: per label, the round(fraction * examples) examples
  (at least one of a label with two or more, never all) of lowest hash of all their `columns`."""
  if not 0 < fraction < 1:
    raise DataError(f'finetune.validation_fraction={fraction} must be in [0, 1)')
  rows = ['\x1f'.join(values) for values in zip(*columns)]
  by_label: dict = {}
  for i, label in enumerate(labels):
    by_label.setdefault(label, []).append(i)
  held = []
  for members in by_label.values():
    ranked = sorted(members, key=lambda i: (text_rank(rows[i]), rows[i]))
    held.extend(ranked[:min(max(int(round(fraction * len(members))), 1), len(members) - 1)])
  mask = np.zeros(len(rows), bool)
  mask[held] = True
  return np.flatnonzero(~mask), np.flatnonzero(mask)


def _hold_out_validation(ft, train: Split, columns: Sequence[str], key: Sequence) -> tuple[Split, Split, str]:
  """(train, validation, where from) held out of the train split: by distinct text, else by example."""
  keep, held = hold_out(train.columns[columns[0]], key, ft.validation_fraction)
  if len(held):
    return train.take(keep), train.take(held), 'held out of train'
  keep, held = hold_out_by_example([train.columns[c] for c in columns], key, ft.validation_fraction)
  if len(held) == 0:
    raise DataError(f'finetune.validation_fraction={ft.validation_fraction} holds out no example of the '
                    f'{len(train)} train examples (every label has one example): add examples or set '
                    'finetune.validation_files')
  log.warning('finetune.validation_fraction=%g holds out no text of the %d train examples (each label\'s '
              'examples are copies of one %s, kept together): holding out %d examples instead, which repeat '
              'train texts (validation then measures fit, not generalisation; set finetune.validation_files '
              'for a fair choice)', ft.validation_fraction, len(train), columns[0], len(held))
  return train.take(keep), train.take(held), 'held out of train by example: copies of train texts'


def _read(ft, split: str, columns: Sequence[str]) -> Split:
  return Split(labeled.load_split(ft, split, columns))


def _read_validation_files(ft, columns: Sequence[str]) -> Split:
  if ft.source not in ('csv', 'jsonl'):
    raise DataError(f'finetune.validation_files needs finetune.source csv or jsonl (it is {ft.source!r}); '
                    'use finetune.validation_fraction instead')
  cols = labeled.read_files(ft.source, ft.validation_files, columns, 'finetune.validation_files')
  if not cols[columns[0]]:
    raise DataError(f'finetune.validation_files={ft.validation_files!r} holds no examples')
  return Split(cols)


def uses_validation(ft) -> bool:
  """Whether the run has a validation split (classify and prompt tasks)."""
  return ft.task in ('classify', 'prompt') and bool(ft.validation_files or ft.validation_fraction > 0)


def load(ft) -> LabeledData:
  """The splits of a classify or prompt fine-tune (finetune section `ft`), with class ids for classify."""
  classify = ft.task == 'classify'
  columns = (ft.text_feature, ft.label_feature) if classify else (ft.prompt_feature, ft.response_feature)
  train, evaluation = _read(ft, 'train', columns), _read(ft, 'eval', columns)
  validation, source = None, ''
  if ft.validation_files and ft.task in ('classify', 'prompt'):
    validation, source = _read_validation_files(ft, columns), 'files'
  elif uses_validation(ft):
    key = train.columns[ft.label_feature] if classify else [''] * len(train)
    train, validation, source = _hold_out_validation(ft, train, columns, key)
  names = ()
  if classify:
    names = labeled.label_set(ft, train.columns[ft.label_feature])
    for split, name in ((train, 'train'), (validation, 'validation'), (evaluation, 'eval')):
      if split is not None:
        split.ids = labeled.label_ids(split.columns[ft.label_feature], names, name)
  return LabeledData(train, validation, evaluation, names, source)

