"""Per-example predictions of a classifier as JSONL, one line per example in input order:

    {"index": 0, "text": "...", "prediction": "spam", "probabilities": {"ham": 0.1, "spam": 0.9},
     "label": "spam"}

"label" is present where the example's true class is known. Written by fine-tuning's evaluation
and by `fmjax.classify`; `confusion_from_predictions` turns such a file back into the confusion
matrix its metrics come from.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from fmjax.runtime import paths
from fmjax.finetune import task_metrics
from fmjax.data.errors import DataError


def prediction_records(texts: Sequence[str], probabilities, class_names: Sequence[str],
                       labels: Sequence[str | None] | None = None, predictions=None) -> list[dict]:
  """The records `write_predictions` writes (probabilities as float32). `predictions` (class ids)
  default to the argmax of `probabilities`; pass the model's own when it has them (ties in rounded
  probabilities)."""
  probabilities = np.asarray(probabilities, np.float32)
  names = [str(n) for n in class_names]
  if probabilities.shape != (len(texts), len(names)):
    raise ValueError(f'probabilities have shape {probabilities.shape}, expected ({len(texts)}, {len(names)})')
  if labels is not None and len(labels) != len(texts):
    raise ValueError(f'{len(labels)} labels for {len(texts)} texts')
  if not np.isfinite(probabilities).all():
    bad = int(np.argwhere(~np.isfinite(probabilities))[0, 0])
    raise ValueError(f'the probabilities of example {bad} are not finite: the model produced NaN or inf')
  ids = np.argmax(probabilities, -1) if predictions is None else np.asarray(predictions)
  records = []
  for i, text in enumerate(texts):
    record = {'index': i, 'text': text, 'prediction': names[int(ids[i])],
              'probabilities': {n: _short(p) for n, p in zip(names, probabilities[i])}}
    if labels is not None and labels[i] is not None:
      record['label'] = str(labels[i])
    records.append(record)
  return records


def _short(p: np.float32) -> float:
  """The shortest decimal that reads back as the same float32 (0.43823421, not 0.43823421001434326)."""
  return float(str(p))


def to_jsonl(records: Sequence[dict]) -> str:
  """Strict JSON lines (non-ASCII kept as UTF-8), each ending in a newline."""
  return ''.join(json.dumps(r, ensure_ascii=False, allow_nan=False) + '\n' for r in records)


def write_predictions(path: str, texts: Sequence[str], probabilities, class_names: Sequence[str],
                      labels: Sequence[str | None] | None = None, predictions=None) -> None:
  """Write the JSONL predictions file atomically (a temporary file renamed), creating its directory."""
  text = to_jsonl(prediction_records(texts, probabilities, class_names, labels, predictions))
  paths.write_text(path, text)


def read_predictions(path: str) -> list[dict]:
  """The records of a predictions file, in file order."""
  try:
    lines = paths.read_text(path).splitlines()
  except OSError as e:
    raise DataError(f'cannot read the predictions file {path}: {e.strerror or e}') from None
  records = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{n}: not a JSON line ({e.msg})') from None
  return records


def confusion_from_predictions(records: Sequence[dict], class_names: Sequence[str]) -> np.ndarray:
  """The confusion matrix (rows true, columns predicted) of records that all carry a 'label'."""
  index = {str(n): i for i, n in enumerate(class_names)}
  labels, predicted = [], []
  for r in records:
    if 'label' not in r:
      raise DataError(f'prediction {r.get("index", "?")} has no label: a confusion matrix needs every label')
    for key in ('label', 'prediction'):
      if r[key] not in index:
        raise DataError(f'prediction {r.get("index", "?")} has {key} {r[key]!r}, not one of the classes '
                        f'({", ".join(index)})')
    labels.append(index[r['label']])
    predicted.append(index[r['prediction']])
  return task_metrics.confusion_matrix(labels, predicted, len(index))
