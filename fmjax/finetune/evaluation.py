"""Fine-tuning evaluation: classification reports (metrics, confusion matrices as JSON and PNG) or
the LM evaluation summary, and the best checkpoint kept by a chosen metric."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from fmjax import checkpoint, distributed, loop, task_metrics
from fmjax import evaluate as evaluate_lib
from fmjax import sharding as shd
from fmjax.finetune.classifier import predict_fn


class BestTracker:
  """Keeps the latest and best eval reports, and a copy of the best state in WORKDIR/best."""

  def __init__(self, workdir: str, metric: str, mode: str, meta: dict):
    self.metric, self.mode, self.meta = metric, mode, meta
    self.last = self.best = None
    self.path = os.path.join(workdir, 'best.json')
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.best = json.load(f)
    self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'best'), keep=1, async_save=False)

  def update(self, step: int, report: dict, state) -> bool:
    self.last = dict(report, step=step)
    value = report[self.metric]
    better = self.best is None or (value > self.best[self.metric] if self.mode == 'max' else
                                   value < self.best[self.metric])
    if better:
      self.best = self.last
      self.ckpt.save(step, state, self.meta, force=True)
      if distributed.is_leader():
        with open(self.path, 'w') as f:
          json.dump(self.best, f, indent=2)
    return better

  def close(self):
    self.ckpt.close()


def evaluation(cfg, parts, workdir: str, meta: dict, writer):
  """`evaluate(state, step) -> scalars` for the loop (writes JSON, PNG, best checkpoint) and its tracker."""
  ft, run = cfg.finetune, parts.run
  classify = ft.task == 'classify'
  tracker = BestTracker(workdir, ft.best_metric if classify else 'loss', ft.best_mode if classify else 'min', meta)
  eval_dir = os.path.join(workdir, 'eval')
  if classify:
    jitted = jax.jit(predict_fn(parts.classifier), out_shardings=shd.replicated(run.mesh),
                     in_shardings=(run.state.shardings.params, {k: run.batch_sharding for k in parts.eval_rows}))
  else:
    evaluator = evaluate_lib.make_evaluator(run, parts.tokenizer.token_byte_lengths())

  def evaluate(state, step):
    if not classify:
      out = evaluator(state.params, parts.eval_batches())
      tracker.update(step, out, state)
      return out
    preds, labels = [], []
    for b in parts.eval_batches():
      with shd.activate(run.mesh, run.rules):
        out = jax.device_get(jitted(state.params, loop.to_global(b, run.batch_sharding)))
      preds.append(out['prediction'][out['valid']])
      labels.append(out['label'][out['valid']])
    cm = task_metrics.confusion_matrix(np.concatenate(labels), np.concatenate(preds), len(parts.class_names))
    report = task_metrics.report(cm, parts.class_names)
    if tracker.update(step, report, state) and distributed.is_leader():
      task_metrics.plot_confusion(report, os.path.join(eval_dir, 'best_confusion.png'),
                                  f'step {step}: macro-F1 {report["macro_f1"]:.3f}')
    if distributed.is_leader():
      task_metrics.write_json(dict(report, step=step), os.path.join(eval_dir, f'step_{step}.json'))
      task_metrics.plot_confusion(report, os.path.join(eval_dir, f'confusion_step_{step}.png'),
                                  f'step {step}: accuracy {report["accuracy"]:.3f}, macro-F1 {report["macro_f1"]:.3f}')
    return task_metrics.scalars(report)

  return evaluate, tracker
