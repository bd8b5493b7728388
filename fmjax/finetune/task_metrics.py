"""Classification metrics from a confusion matrix: accuracy, precision, recall, F1, and their output.

`confusion[i, j]` counts examples of true class i predicted as class j. A class with no
predictions (or no examples) has precision (or recall) 0, and F1 0 when both are 0.
"""

from __future__ import annotations

import io
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
  """Save the confusion matrix as a PNG; False (nothing written) when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  cm, names = np.asarray(rep['confusion']), rep['class_names']
  size = 1.5 + 0.6 * len(names)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  im = ax.imshow(cm, cmap='Blues')
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  for i in range(cm.shape[0]):
    for j in range(cm.shape[1]):
      ax.text(j, i, str(cm[i, j]), ha='center', va='center',
              color='white' if cm[i, j] > cm.max() / 2 else 'black')
  ax.set_title(title or f'accuracy {rep["accuracy"]:.3f}, macro-F1 {rep["macro_f1"]:.3f}')
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  paths.write_bytes(path, png.getvalue())
  return True
