"""The end of a classification fine-tune: the n-gram baseline beside the model, as a table and as
WORKDIR/summary.json.

summary.json holds, per split ('eval' and, when there is one, 'validation'): the report of the best
checkpoint ('best', chosen on the split named by `chosen_on`), of the last step ('last') and of the
bag-of-character-n-grams baseline trained on the same train split ('baseline'); plus `best_step`,
`last_step`, `chosen_on` and the baseline's model description.
"""

from __future__ import annotations

import json
import time

import numpy as np

from fmjax.runtime import paths
from fmjax.finetune import task_metrics
from fmjax.finetune.baseline import ngram_baseline



def fit_baseline(ft, data, log=print) -> dict:
  """The n-gram baseline (fmjax/finetune/baseline.py) fitted on the train split: {'eval': report,
  'validation': report or None, 'model': description}."""
  started = time.perf_counter()
  held = {split: getattr(data, split) for split in ('eval', 'validation') if getattr(data, split) is not None}
  texts = [t for split in held.values() for t in split.columns[ft.text_feature]]
  ids = np.concatenate([split.ids for split in held.values()])
  # one fit on the train split, predicting every held-out split at once
  result = ngram_baseline(data.train.columns[ft.text_feature], data.train.ids, texts, ids, data.class_names, seed=0)
  out = {'validation': None, 'model': result.get('model', 'n-gram baseline')}
  start = 0
  for name, split in held.items():
    predicted = result['predictions'][start:start + len(split)]
    start += len(split)
    confusion = task_metrics.confusion_matrix(split.ids, predicted, len(data.class_names))
    out[name] = dict(task_metrics.report(confusion, data.class_names), fit_seconds=result['fit_seconds'])
  parts = [f'{s} macro-F1 {out[s]["macro_f1"]:.3f}' for s in ('validation', 'eval') if out[s] is not None]
  log(f'n-gram baseline ({out["model"]}): {", ".join(parts)} ({time.perf_counter() - started:.1f}s)')
  return out


def summarize(tracker, baseline: dict | None, last_step: int) -> dict:
  """The run's summary (see the module docstring) from the best tracker and the baseline."""
  best, last = tracker.best or {}, tracker.last or {}
  chosen_on = best.get('chosen_on', tracker.split)
  out = {'chosen_on': chosen_on, 'best_step': best.get('step'), 'last_step': last_step,
         'eval': {}, 'validation': {} if chosen_on == 'validation' else None}
  if chosen_on == 'validation':
    out['validation'].update(best=_strip(best), last=_strip(last))
    out['eval'].update(best=best.get('eval'), last=last.get('eval'))
  else:
    out['eval'].update(best=_strip(best), last=_strip(last))
  if baseline:
    out['baseline_model'] = baseline.get('model')
    for split in ('eval', 'validation'):
      if out[split] is not None and baseline.get(split) is not None:
        out[split]['baseline'] = baseline[split]
  return out


def _strip(report: dict) -> dict | None:
  return {k: v for k, v in report.items() if k not in ('eval', 'chosen_on')} or None


def tables(summary: dict) -> str:
  """The summary's reports side by side, one table per split."""
  blocks = []
  for split in ('eval', 'validation'):
    reports = summary.get(split) or {}
    named = {}
    for key, name in (('best', f'best (step {summary["best_step"]})'), ('last', f'last (step {summary["last_step"]})'),
                      ('baseline', 'n-gram baseline')):
      if reports.get(key):
        named[name] = reports[key]
    if named:
      chose = ' (chooses the best checkpoint)' if split == summary['chosen_on'] else ' (reported only)'
      blocks.append(f'{split} split{chose}:\n{task_metrics.table(named)}')
  return '\n\n'.join(blocks)


def write_summary(path: str, summary: dict) -> None:
  paths.write_text(path, json.dumps(summary, indent=2))
