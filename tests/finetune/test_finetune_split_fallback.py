"""The fine-tuning validation split when holding out by distinct text gives none: held out by example."""

import csv
import hashlib
import json
import logging

import pytest

from fmjax.data.errors import DataError
from fmjax.finetune import splits
from helpers import tiny_config


def _write_csv(path, rows):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(('text', 'label'))
    w.writerows(rows)
  return str(path)


def _classify(tmp_path, rows, fraction=0.1):
  ft = tiny_config().finetune
  ft.task, ft.source, ft.validation_fraction = 'classify', 'csv', fraction
  ft.train_files = _write_csv(tmp_path / 'train.csv', rows)
  ft.eval_files = _write_csv(tmp_path / 'eval.csv', [('great film', 'pos'), ('dull film', 'neg')])
  return ft


def _rank(*values):   # the reference hash: blake2b-64 of the example's columns joined by U+001F
  return int.from_bytes(hashlib.blake2b('\x1f'.join(values).encode(), digest_size=8).digest(), 'big')


def test_forty_copies_of_two_texts_hold_out_examples_with_a_notice(tmp_path, caplog):
  rows = [('great film', 'pos') if i % 2 else ('dull film', 'neg') for i in range(40)]
  ft = _classify(tmp_path, rows)
  assert len(splits.hold_out([r[0] for r in rows], [r[1] for r in rows], 0.1)[1]) == 0   # by distinct text: none
  with caplog.at_level(logging.WARNING, logger='fmjax'):
    data = splits.load(ft)
  assert len(data.train) == 36 and len(data.validation) == 4    # round(0.1 * 20) = 2 of each label
  assert sorted(data.validation.columns['label']) == ['neg', 'neg', 'pos', 'pos']
  assert sorted(data.train.columns['label']) == ['neg'] * 18 + ['pos'] * 18
  assert data.validation_from.startswith('held out of train by example')
  notices = [r.getMessage() for r in caplog.records if 'holds out no text' in r.getMessage()]
  assert len(notices) == 1 and '\n' not in notices[0] and 'holding out 4 examples instead' in notices[0]
  assert data.class_names == ('neg', 'pos') and data.validation.ids.tolist().count(0) == 2


def test_prompt_examples_of_one_prompt_hold_out_the_lowest_hashes_in_any_order(tmp_path):
  responses = [f'answer number {i}' for i in range(40)]
  ft = tiny_config().finetune
  ft.task, ft.source, ft.validation_fraction = 'prompt', 'jsonl', 0.1

  def write(name, order):
    with open(tmp_path / name, 'w', encoding='utf-8') as f:
      for i in order:
        f.write(json.dumps({'prompt': 'Say something:', 'response': responses[i]}) + '\n')
    return str(tmp_path / name)
  ft.eval_files = write('eval.jsonl', [0])
  expected = sorted(sorted(responses, key=lambda r: _rank('Say something:', r))[:4])
  for name, order in (('a.jsonl', range(40)), ('b.jsonl', reversed(range(40)))):
    ft.train_files = write(name, order)
    data = splits.load(ft)
    assert sorted(data.validation.columns['response']) == expected     # a pure function of the examples
    assert sorted(data.train.columns['response'] + data.validation.columns['response']) == sorted(responses)


def test_distinct_texts_still_split_by_text(tmp_path):
  rows = [(f'text {i % 10}', ('neg', 'pos')[i % 2]) for i in range(40)]   # 5 distinct texts per label, 4 copies each
  data = splits.load(_classify(tmp_path, rows, fraction=0.2))
  assert data.validation_from == 'held out of train'
  assert not set(data.train.columns['text']) & set(data.validation.columns['text'])


def test_one_example_per_label_cannot_hold_out(tmp_path):
  with pytest.raises(DataError, match='holds out no example of the 2 train examples .*every label has one example'):
    splits.load(_classify(tmp_path, [('great film', 'pos'), ('dull film', 'neg')]))
