"""Task metrics against hand-computed values on a fixed confusion matrix."""

import json

import numpy as np
import pytest

from fmjax import task_metrics


def test_report_matches_hand_computed_reference():
  # rows: true a, b, c; columns: predicted a, b, c
  cm = np.array([[5, 1, 0],
                 [2, 3, 1],
                 [0, 0, 4]])
  rep = task_metrics.report(cm, ['a', 'b', 'c'])
  # precision: a 5/7, b 3/4, c 4/5; recall: a 5/6, b 3/6, c 4/4
  p = np.array([5 / 7, 3 / 4, 4 / 5])
  r = np.array([5 / 6, 1 / 2, 1.0])
  f1 = 2 * p * r / (p + r)        # a 10/13, b 0.6, c 8/9
  assert rep['accuracy'] == pytest.approx(12 / 16)
  assert rep['macro_precision'] == pytest.approx(p.mean())
  assert rep['macro_recall'] == pytest.approx(r.mean())
  assert rep['macro_f1'] == pytest.approx((10 / 13 + 0.6 + 8 / 9) / 3)
  for name, f in zip('abc', f1):
    assert rep['per_class'][name]['f1'] == pytest.approx(f)
  assert [rep['per_class'][n]['support'] for n in 'abc'] == [6, 6, 4]
  assert rep['confusion'] == cm.tolist()


def test_confusion_matrix_and_empty_class():
  cm = task_metrics.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 1], 3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])
  rep = task_metrics.report(cm, ['x', 'y', 'z'])
  assert rep['per_class']['z'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1}


def test_outputs(tmp_path):
  rep = task_metrics.report(np.array([[3, 1], [0, 4]]), ['neg', 'pos'])
  task_metrics.write_json(rep, str(tmp_path / 'r.json'))
  assert json.loads((tmp_path / 'r.json').read_text())['accuracy'] == pytest.approx(7 / 8)
  text = task_metrics.table({'one': rep, 'two': rep})
  assert 'macro_f1' in text and 'f1[pos]' in text and 'two' in text
  pytest.importorskip('matplotlib')
  assert task_metrics.plot_confusion(rep, str(tmp_path / 'cm.png'))
  assert (tmp_path / 'cm.png').read_bytes()[:4] == b'\x89PNG'
