"""Fine-tuning evaluation: classification reports (metrics, confusion matrices as JSON, PNG and a
TensorBoard image, per-example predictions) or the LM evaluation summary, and the best checkpoint.

With a validation split (fmjax/finetune/splits.py) the best checkpoint is chosen on validation and the
eval split is only reported; without one the eval split chooses, with a warning saying so.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

from fmjax.runtime import distributed
from fmjax.training import loop, session
from fmjax.runtime import paths
from fmjax.finetune import task_metrics
from fmjax.inference import evaluate as evaluate_lib
from fmjax.parallel import sharding as shd
from fmjax.finetune import predictions
from fmjax.objectives.classification import predict_fn

CHOICE_WARNING = ('warning: no validation split (finetune.validation_fraction=0, no finetune.validation_files): '
                  'the eval split chooses the best checkpoint, so its best metrics are optimistic')


class BestTracker:
  """Keeps the latest and best reports, and a copy of the best state in WORKDIR/best.

  The best is chosen on `split` ('validation' or 'eval'); best.json holds that split's report with
  `step` and `chosen_on`, and under 'eval' the eval report of the same step when validation chose.
  """

  def __init__(self, workdir: str, metric: str, mode: str, meta: dict, split: str = 'eval'):
    self.metric, self.mode, self.meta, self.split = metric, mode, meta, split
    self.last = self.best = None
    self.path = paths.join(workdir, 'best.json')
    if paths.exists(self.path):
      self.best = json.loads(paths.read_text(self.path))
      if self.best.get('chosen_on', 'eval') != split:  # the choice was made on another split: start over
        self.best = None
    self.ckpt = session.BestCheckpoints(paths.join(workdir, 'best'), meta)   # written by the run lifecycle

  def update(self, step: int, report: dict, state, eval_report: dict | None = None) -> bool:
    """Record the `split` report of `step` (and the eval split's, when that is not the choosing split)."""
    self.last = dict(report, step=step, chosen_on=self.split)
    if eval_report is not None:
      self.last['eval'] = dict(eval_report, step=step)
    value = report[self.metric]
    better = self.best is None or (value > self.best[self.metric] if self.mode == 'max' else
                                   value < self.best[self.metric])
    if better:
      self.best = self.last
      self.ckpt.save(step, state)
      if distributed.is_leader():
        write_best(self.path, self.best)
    return better

  def close(self):
    self.ckpt.close()


def write_best(path: str, best: dict) -> None:
  paths.write_text(path, json.dumps(best, indent=2))


def confusion_pixels(report: dict, title: str = '') -> np.ndarray | None:
  """The confusion matrix figure of `task_metrics.plot_confusion` as uint8 RGB pixels (H, W, 3); None
  without matplotlib."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'confusion.png')
    if not task_metrics.plot_confusion(report, path, title):
      return None
    import matplotlib.image  # pylint: disable=import-outside-toplevel
    rgba = matplotlib.image.imread(path)       # float in [0, 1] for PNG
  return np.round(np.asarray(rgba)[..., :3] * 255).astype(np.uint8)


def write_predictions(path: str, texts, out: dict, class_names, labels) -> None:
  """The eval split's per-example predictions (`ClassifyEval.predict`'s `out`) as JSONL
  (fmjax/finetune/predictions.py's format), with the model's own predicted ids."""
  predictions.write_predictions(path, texts, out['probabilities'], class_names, labels, predictions=out['prediction'])


class ClassifyEval:
  """Predictions and reports of a classifier on the padded rows of one split."""

  def __init__(self, parts):
    run = parts.run
    self.parts, self.mesh, self.rules, self.batch_sharding = parts, run.mesh, run.rules, run.batch_sharding
    self.jitted = jax.jit(predict_fn(parts.classifier), out_shardings=shd.replicated(run.mesh),
                          in_shardings=(run.state.shardings.params, {k: run.batch_sharding for k in parts.eval_rows}))

  def predict(self, params, rows) -> dict:
    """{'prediction', 'label' (n,), 'probabilities' (n, C)} over the real examples of `rows`, in order."""
    outs = []
    for b in self.parts.eval_batches(rows):
      with shd.activate(self.mesh, self.rules):
        out = jax.device_get(self.jitted(params, loop.to_global(b, self.batch_sharding)))
      valid = out['valid']
      outs.append({k: np.asarray(out[k])[valid] for k in ('prediction', 'label', 'probabilities')})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def report(self, out: dict) -> dict:
    names = self.parts.class_names
    return task_metrics.report(task_metrics.confusion_matrix(out['label'], out['prediction'], len(names)), names)


def baseline_scalars(baseline: dict) -> dict:
  """TensorBoard scalars of the n-gram baseline's reports: eval/... and validation/..."""
  out = {}
  for split in ('eval', 'validation'):
    rep = baseline.get(split)
    if rep is not None:
      out.update({f'{split}/{k}': v for k, v in task_metrics.scalars(rep).items()})
  return out


def best_tracker(cfg, parts, workdir: str, meta: dict) -> BestTracker:
  """What 'best' means for the task: classify by finetune.best_metric / best_mode, else the lowest loss;
  chosen on the validation split when there is one, else on eval."""
  ft = cfg.finetune
  classify = ft.task == 'classify'
  split = 'validation' if parts.validation_rows is not None else 'eval'
  return BestTracker(workdir, ft.best_metric if classify else 'loss', ft.best_mode if classify else 'min', meta,
                     split)


def evaluation(cfg, parts, workdir: str, tracker: BestTracker, writer, baseline: dict | None = None):
  """`evaluate(state, step) -> eval scalars` for the loop, reporting to `tracker` (see `best_tracker`).

  Classification writes, at each eval on process 0: eval/step_N.json (+ validation_step_N.json),
  eval/confusion_step_N.png, eval/predictions_step_N.jsonl, TensorBoard scalars validation/* and
  baseline/* (the n-gram baseline's fixed reports) and the image eval/confusion.
  """
  ft, run = cfg.finetune, parts.run
  if ft.task in ('sft', 'dpo'):
    return chat_evaluation(cfg, parts, workdir, tracker, writer)
  classify = ft.task == 'classify'
  validation = parts.validation_rows is not None
  if ft.task != 'lm' and not validation:
    writer.log(CHOICE_WARNING)
  eval_dir = paths.join(workdir, 'eval')
  if classify:
    predictor = ClassifyEval(parts)
  else:
    evaluator = evaluate_lib.make_evaluator(run, parts.tokenizer.token_byte_lengths())

  def evaluate_lm(state, step):
    out = evaluator(state.params, parts.eval_batches())
    if not validation:
      tracker.update(step, out, state)
      return out
    held = evaluator(state.params, parts.eval_batches(parts.validation_rows))
    writer.write(step, held, prefix='validation')
    tracker.update(step, held, state, eval_report=out)
    return out

  baseline_shown = []   # the eval steps whose baseline line was written (printed at the first only)

  def evaluate(state, step):
    if not classify:
      return evaluate_lm(state, step)
    out = predictor.predict(state.params, parts.eval_rows)
    report = predictor.report(out)
    held = predictor.report(predictor.predict(state.params, parts.validation_rows)) if validation else None
    better = tracker.update(step, held or report, state, eval_report=report if validation else None)
    if distributed.is_leader():
      _write_eval_outputs(parts, eval_dir, step, report, held, out, better, writer)
      if held is not None:
        writer.write(step, task_metrics.scalars(held), prefix='validation')
      if baseline:   # fixed numbers: every eval's files and TensorBoard get them, the console the first time
        writer.write(step, baseline_scalars(baseline), prefix='baseline', console=not baseline_shown)
        baseline_shown.append(step)
    return task_metrics.scalars(report)

  return evaluate


def chat_evaluation(cfg, parts, workdir: str, tracker: BestTracker, writer):
  """`evaluate(state, step)` of sft (the LM loss on assistant tokens) and dpo (the pair metrics of
  fmjax/finetune/chat_eval.py): the eval split, the validation split (which chooses the best by its loss)
  and greedy samples of finetune.sample_prompts held-out prompts (eval/samples_step_N.jsonl, the
  console, and their exact-match share as sample_exact_match)."""
  from fmjax.finetune import chat_eval  # pylint: disable=import-outside-toplevel
  ft, run = cfg.finetune, parts.run
  validation = parts.validation_rows is not None
  if not validation:
    writer.log(CHOICE_WARNING)
  if ft.task == 'dpo':
    measure = chat_eval.PairEval(run, ft)
  else:
    measure = evaluate_lib.make_evaluator(run, parts.tokenizer.token_byte_lengths())
  held_out = parts.data.validation if validation else parts.data.eval
  sampling = ft.sample_prompts > 0 and jax.process_count() == 1
  if ft.sample_prompts and not sampling:
    writer.log('finetune.sample_prompts: samples are generated in single-process runs only; none in this one')
  decoder = chat_eval.SampleDecoder(cfg, parts.tokenizer, parts.task) if sampling else None

  def evaluate(state, step):
    out = measure(state.params, parts.eval_batches())
    if validation:
      held = measure(state.params, parts.eval_batches(parts.validation_rows))
      writer.write(step, held, prefix='validation')
      tracker.update(step, held, state, eval_report=out)
    else:
      tracker.update(step, out, state)
    if sampling:
      rows = chat_eval.samples(decoder.view, parts.template, held_out, decoder.params(state.params), ft.sample_prompts,
                               ft.sample_tokens)
      if rows:
        out = dict(out, sample_exact_match=float(np.mean([r['exact'] for r in rows])))
        chat_eval.write_samples(paths.join(workdir, 'eval', f'samples_step_{step}.jsonl'), rows)
        for line in chat_eval.sample_lines(step, rows):
          writer.log(line)
    return out

  return evaluate


def _write_eval_outputs(parts, eval_dir: str, step: int, report: dict, held: dict | None, out: dict, better: bool,
                        writer) -> None:
  """Process 0's files and images of one classification eval."""
  title = f'step {step}: accuracy {report["accuracy"]:.3f}, macro-F1 {report["macro_f1"]:.3f}'
  task_metrics.write_json(dict(report, step=step), paths.join(eval_dir, f'step_{step}.json'))
  if held is not None:
    task_metrics.write_json(dict(held, step=step), paths.join(eval_dir, f'validation_step_{step}.json'))
  task_metrics.plot_confusion(report, paths.join(eval_dir, f'confusion_step_{step}.png'), title)
  if better:
    chosen = held or report
    task_metrics.plot_confusion(report, paths.join(eval_dir, 'best_confusion.png'),
                                f'step {step} (best {"validation" if held else "eval"} macro-F1 '
                                f'{chosen["macro_f1"]:.3f}): eval macro-F1 {report["macro_f1"]:.3f}')
  pixels = confusion_pixels(report, title)
  if pixels is not None:
    writer.image('eval/confusion', pixels, step)
  ft, data = parts.cfg.finetune, parts.data
  write_predictions(paths.join(eval_dir, f'predictions_step_{step}.jsonl'), data.eval.columns[ft.text_feature],
                    out, parts.class_names, data.eval.columns[ft.label_feature])
