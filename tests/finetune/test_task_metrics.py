"""Task metrics against hand-computed values on a fixed confusion matrix."""

import json

import numpy as np
import pytest

from fmjax.finetune import task_metrics


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


def _labels_from_confusion(cm):
  """(y_true, y_pred) lists whose confusion matrix is cm."""
  true, pred = [], []
  for i, row in enumerate(cm):
    for j, n in enumerate(row):
      true += [i] * int(n)
      pred += [j] * int(n)
  return np.array(true), np.array(pred)


def _assert_matches_sklearn(cm):
  from sklearn import metrics  # the test extra installs it: never skip the reference
  k = cm.shape[0]
  names = [f'c{i}' for i in range(k)]
  rep = task_metrics.report(cm, names)
  y_true, y_pred = _labels_from_confusion(cm)
  labels = list(range(k))
  p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
  for i, name in enumerate(names):
    got = rep['per_class'][name]
    assert abs(got['precision'] - p[i]) <= 1e-12 and abs(got['recall'] - r[i]) <= 1e-12
    assert abs(got['f1'] - f[i]) <= 1e-12, (cm.tolist(), name, got['f1'], f[i])
    assert got['support'] == s[i]
  mp, mr, mf, _ = metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0,
                                                          average='macro')
  assert abs(rep['macro_precision'] - mp) <= 1e-12
  assert abs(rep['macro_recall'] - mr) <= 1e-12
  assert abs(rep['macro_f1'] - mf) <= 1e-12
  assert abs(rep['accuracy'] - metrics.accuracy_score(y_true, y_pred)) <= 1e-12


def test_f1_when_precision_plus_recall_is_below_one():
  # The example: class a has precision 1/3 and recall 1/2; F1 = 2 * (1/6) / (5/6) = 0.4.
  rep = task_metrics.report(task_metrics.confusion_matrix([0, 0, 1, 1], [0, 1, 0, 0], 2), 'ab')
  assert rep['per_class']['a']['f1'] == pytest.approx(0.4, abs=1e-15)
  _assert_matches_sklearn(np.asarray(rep['confusion']))


def test_agrees_with_sklearn_on_random_confusion_matrices():
  rng = np.random.default_rng(0)
  for trial in range(600):
    k = int(rng.integers(2, 7))
    cm = rng.integers(0, 6, size=(k, k))
    if trial % 3 == 0:   # empty classes: no examples of a class
      cm[rng.integers(0, k)] = 0
    if trial % 4 == 0:   # a class that is never predicted
      cm[:, rng.integers(0, k)] = 0
    if trial % 7 == 0:   # sparse, mostly-wrong matrices: precision + recall < 1 is common
      cm = cm * (rng.random((k, k)) < 0.3)
    if cm.sum() == 0:
      cm[0, 1] = 1
    _assert_matches_sklearn(cm)


def test_edge_cases_agree_with_sklearn():
  for cm in ([[0, 0], [0, 5]], [[0, 3], [0, 0]], [[2, 0, 0], [0, 0, 0], [1, 0, 0]], [[1, 9], [9, 1]]):
    _assert_matches_sklearn(np.array(cm))


def test_best_checkpoint_follows_sklearn_macro_f1(tmp_path):
  """The fine-tune tracker keeps the eval whose (sklearn) macro-F1 is highest."""
  from sklearn import metrics  # the test extra installs it: never skip the reference
  import jax.numpy as jnp
  from fmjax.finetune import BestTracker
  rng = np.random.default_rng(1)
  tracker = BestTracker(str(tmp_path), 'macro_f1', 'max', {'note': 'test'})
  expected = []
  for step in range(1, 9):
    cm = rng.integers(0, 5, size=(3, 3))
    y_true, y_pred = _labels_from_confusion(cm)
    expected.append((metrics.f1_score(y_true, y_pred, labels=[0, 1, 2], average='macro', zero_division=0), step))
    tracker.update(step, task_metrics.report(cm, 'xyz'), {'w': jnp.full((2,), float(step))})
  tracker.close()
  best_f1, best_step = max(expected, key=lambda e: (e[0], -e[1]))
  assert tracker.best['step'] == best_step
  assert tracker.best['macro_f1'] == pytest.approx(best_f1, abs=1e-12)


LONG_TITLE = 'step 250 (best validation macro-F1 0.912): eval macro-F1 0.905, a title longer than the figure'


@pytest.mark.parametrize('names', [('neg', 'pos'), ('asyncio', 'email', 'tkinter', 'multiprocessing'),
                                   tuple(f'a_really_long_class_name_number_{i}' for i in range(20))])
def test_confusion_png_is_readable_at_its_written_size(tmp_path, names):
  pytest.importorskip('matplotlib')
  from PIL import Image
  from fmjax.finetune import confusion_plot
  n = len(names)
  cm = np.random.default_rng(n).integers(0, 60, (n, n)) + np.diag(np.full(n, 12000))
  rep = task_metrics.report(cm, names)
  fig = confusion_plot.figure(rep, LONG_TITLE)
  fig.canvas.draw()
  ax, bar = fig.axes
  assert (ax.get_xlabel(), ax.get_ylabel(), bar.get_ylabel()) == ('predicted class', 'true class', 'examples')
  cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
  assert cells == {(i, j): (f'{cm[i, j] / 1000:.1f}k' if cm[i, j] >= 10_000 else str(cm[i, j]))
                   for i in range(n) for j in range(n)}
  shown_x = [t.get_text() for t in ax.get_xticklabels()]
  assert shown_x == [t.get_text() for t in ax.get_yticklabels()] == [confusion_plot.short_label(s) for s in names]
  assert len(set(shown_x)) == n and all(len(s) <= confusion_plot.LABEL_CHARS for s in shown_x)
  assert all(s.startswith(name[:5]) and s.endswith(name[-5:]) for s, name in zip(shown_x, names))
  lo, hi = bar.get_ylim()
  scale = [t for t in bar.get_yticklabels() if lo <= t.get_position()[1] <= hi]   # the ticks drawn
  assert len(scale) >= 3
  words = [t for t in [ax.title, ax.xaxis.label, ax.yaxis.label, bar.yaxis.label]
           + ax.get_xticklabels() + ax.get_yticklabels() + scale if t.get_text()]
  renderer = fig.canvas.get_renderer()
  inside = fig.bbox
  for t in words + list(ax.texts):   # nothing is cut off by the image's edge
    box = t.get_window_extent(renderer)
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, t
  assert min(t.get_fontsize() for t in words) >= confusion_plot.MIN_FONT_POINTS
  def collide(texts, others=None):
    boxes = [t.get_window_extent(renderer) for t in texts]
    pairs = [(a, b) for i, a in enumerate(boxes) for b in (boxes[i + 1:] if others is None else
                                                           [t.get_window_extent(renderer) for t in others])]
    return any(a.overlaps(b) for a, b in pairs)
  xs, ys = ax.get_xticklabels(), ax.get_yticklabels()
  assert not collide(ys) and not collide(xs, ys)            # class labels do not run into each other
  angle = np.radians(xs[0].get_rotation())
  if angle:   # slanted labels are parallel strips: the gap across them must hold the text's height
    step = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
    assert step * np.sin(angle) >= xs[0].get_fontsize() * confusion_plot.DPI / 72
  else:
    assert not collide(xs)
  assert task_metrics.plot_confusion(rep, str(tmp_path / 'cm.png'), LONG_TITLE)
  width, height = Image.open(tmp_path / 'cm.png').size
  assert (width, height) == tuple(round(v * confusion_plot.DPI) for v in fig.get_size_inches())
