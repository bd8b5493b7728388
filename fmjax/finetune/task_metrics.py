"""Classification metrics from a confusion matrix: accuracy, precision, recall, F1, and their output.

`confusion[i, j]` counts examples of true class i predicted as class j. A class with no
predictions (or no examples) has precision (or recall) 0, and F1 0 when both are 0.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from fmjax.runtime import paths


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) int64 counts; rows are true classes, columns predictions."""
  labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, predictions), 1)
  return cm


def _ratio(num, den):
  """num / den elementwise, 0 where den is 0 (sklearn's zero_division=0)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def report(confusion, class_names: Sequence[str]) -> dict:
  """Accuracy, macro and per-class precision/recall/F1/support, and the matrix itself."""
  cm = np.asarray(confusion, np.int64)
  tp = np.diag(cm)
  predicted, actual = cm.sum(0), cm.sum(1)
  precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
  f1 = _ratio(2 * precision * recall, precision + recall)
  total = cm.sum()
  return {
      'accuracy': float(tp.sum() / total) if total else 0.0,
      'macro_precision': float(precision.mean()),
      'macro_recall': float(recall.mean()),
      'macro_f1': float(f1.mean()),
      'examples': int(total),
      'per_class': {name: {'precision': float(p), 'recall': float(r), 'f1': float(f), 'support': int(s)}
                    for name, p, r, f, s in zip(class_names, precision, recall, f1, actual)},
      'class_names': list(class_names),
      'confusion': cm.tolist(),
  }


def scalars(rep: dict) -> dict:
  """The flat scalars of a report (for TensorBoard): summary metrics and per-class F1."""
  out = {k: rep[k] for k in ('accuracy', 'macro_precision', 'macro_recall', 'macro_f1')}
  out.update({f'f1/{name}': v['f1'] for name, v in rep['per_class'].items()})
  return out


def table(reports: dict[str, dict]) -> str:
  """Reports side by side: one column per named report, one row per metric."""
  names = list(reports)
  first = reports[names[0]]
  rows = [(k, [reports[n][k] for n in names]) for k in ('accuracy', 'macro_precision', 'macro_recall', 'macro_f1')]
  for cls in first['class_names']:
    rows.append((f'f1[{cls}]', [reports[n]['per_class'][cls]['f1'] for n in names]))
  width = max(len(r[0]) for r in rows) + 2
  col = max(12, *(len(n) + 2 for n in names))
  lines = [' ' * width + ''.join(n.rjust(col) for n in names)]
  lines += [label.ljust(width) + ''.join(f'{v:.3f}'.rjust(col) for v in values) for label, values in rows]
  return '\n'.join(lines)


def write_json(rep: dict, path: str) -> None:
  """Write a report as JSON (atomically; `path` may be a URL)."""
  paths.write_text(path, json.dumps(rep, indent=2))


def plot_confusion(rep: dict, path: str, title: str = '') -> bool:
  """Save the confusion matrix as a PNG (fmjax/finetune/confusion_plot.py); False (nothing written) when
  matplotlib is missing."""
  try:
    import matplotlib  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  from fmjax.finetune import confusion_plot  # pylint: disable=import-outside-toplevel
  paths.write_bytes(path, confusion_plot.png(rep, title))
  return True
