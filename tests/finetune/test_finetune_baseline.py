"""The n-gram baseline: its predictions are an independently built scikit-learn pipeline's, its
metrics scikit-learn's, a separable task scores F1 1.0, and a missing scikit-learn is one line."""

import sys

import numpy as np
import pytest

pytest.importorskip('sklearn')
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support  # noqa: E402

from fmjax import config as config_lib  # noqa: E402
from fmjax.config import ConfigError  # noqa: E402
from fmjax.data import labeled  # noqa: E402
from fmjax.finetune.baseline import ngram_baseline  # noqa: E402


@pytest.fixture(scope='module')
def demo_task():
  """A small cut of the embedded demo task (4 stdlib packages): hard enough that the baseline errs."""
  ft = config_lib.base_config().finetune
  ft.source, ft.demo_per_class = 'stdlib_packages', 40
  train = labeled.load_split(ft, 'train', ('text', 'label'))
  evals = labeled.load_split(ft, 'eval', ('text', 'label'))
  names = labeled.label_set(ft, train['label'])
  return (train['text'], labeled.label_ids(train['label'], names, 'train'), evals['text'],
          labeled.label_ids(evals['label'], names, 'eval'), names)


def test_predictions_are_the_documented_sklearn_pipeline(demo_task):
  train_x, train_y, eval_x, eval_y, names = demo_task
  out = ngram_baseline(train_x, train_y, eval_x, eval_y, names, seed=3)
  vectorizer = TfidfVectorizer(analyzer='char_wb', ngram_range=(1, 4), lowercase=False, sublinear_tf=True,
                               max_features=100_000, dtype=np.float32)
  model = LogisticRegression(C=10.0, solver='saga', tol=1e-3, max_iter=200, random_state=3)
  model.fit(vectorizer.fit_transform(train_x), train_y)
  features = vectorizer.transform(eval_x)
  np.testing.assert_array_equal(out['predictions'], model.predict(features))
  np.testing.assert_allclose(out['probabilities'], model.predict_proba(features), rtol=1e-6, atol=1e-7)
  assert out['predictions'].dtype == np.int32 and out['probabilities'].dtype == np.float32
  assert out['probabilities'].shape == (len(eval_x), len(names))
  assert out['model'] == 'char 1-4-gram TF-IDF + logistic regression'


def test_metrics_equal_sklearns_on_the_same_predictions(demo_task):
  train_x, train_y, eval_x, eval_y, names = demo_task
  out = ngram_baseline(train_x, train_y, eval_x, eval_y, names)
  pred = out['predictions']
  assert 0.5 < out['accuracy'] < 1.0, out['accuracy']    # errs: the metrics below are not trivially 1
  labels = list(range(len(names)))
  assert out['confusion'] == confusion_matrix(eval_y, pred, labels=labels).tolist()
  assert out['accuracy'] == pytest.approx(accuracy_score(eval_y, pred), abs=1e-12)
  p, r, f, _ = precision_recall_fscore_support(eval_y, pred, labels=labels, average='macro', zero_division=0)
  assert (out['macro_precision'], out['macro_recall'], out['macro_f1']) == pytest.approx((p, r, f), abs=1e-12)
  p, r, f, s = precision_recall_fscore_support(eval_y, pred, labels=labels, average=None, zero_division=0)
  for i, name in enumerate(names):
    got = out['per_class'][name]
    assert (got['precision'], got['recall'], got['f1'], got['support']) == pytest.approx((p[i], r[i], f[i], s[i]))


def _separable(n, seed):
  rng = np.random.default_rng(seed)
  marks = ['aaa', 'mmm', 'xxx']
  ids = np.arange(n) % 3
  texts = [f'{marks[i]} {" ".join(rng.choice(["12", "34", "56", "78"], size=4))}' for i in ids]
  return texts, ids


def test_separable_task_scores_f1_one():
  train_x, train_y = _separable(30, 0)
  eval_x, eval_y = _separable(15, 1)
  out = ngram_baseline(train_x, train_y, eval_x, eval_y, ('a', 'm', 'x'))
  assert out['macro_f1'] == 1.0 and out['accuracy'] == 1.0
  np.testing.assert_array_equal(out['predictions'], eval_y)
  np.testing.assert_allclose(out['probabilities'].sum(1), 1.0, rtol=1e-5)


def test_a_class_missing_from_train_gets_probability_zero():
  train_x, train_y = _separable(30, 0)
  keep = train_y != 1
  eval_x, eval_y = _separable(9, 1)
  out = ngram_baseline([t for t, k in zip(train_x, keep) if k], train_y[keep], eval_x, eval_y, ('a', 'm', 'x'))
  assert (out['probabilities'][:, 1] == 0).all()
  assert out['per_class']['m']['recall'] == 0.0 and out['per_class']['a']['recall'] == 1.0
  one = ngram_baseline(['aaa', 'aab'], [2, 2], eval_x, eval_y, ('a', 'm', 'x'))
  assert (one['predictions'] == 2).all() and (one['probabilities'][:, 2] == 1).all()


def test_missing_scikit_learn_is_a_one_line_config_error(monkeypatch):
  for name in ('sklearn', 'sklearn.exceptions', 'sklearn.feature_extraction.text', 'sklearn.linear_model'):
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(ConfigError, match='pip install scikit-learn') as e:
    ngram_baseline(['a b', 'c d'], [0, 1], ['a'], [0], ('x', 'y'))
  assert '--config.finetune.baseline=false' in str(e.value) and '\n' not in str(e.value)
