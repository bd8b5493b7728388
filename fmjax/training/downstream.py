"""Downstream benchmarks while pretraining: the lm-eval tasks of `eval_tasks`, scored on the live parameters.

The task names are checked when the run starts (lm-eval missing, or a name no task directory defines, is
one line before anything is compiled). The evaluator is built once, after the run: its compiled programs
and loaded task documents are reused at every `eval_tasks_every` steps (0: every checkpoint_every) and at
the end. It runs between steps, like the eval split, in every process (the computation spans them); the
metrics are written by the run's MetricWriter (process 0) as the split 'downstream', before that step's
checkpoint: TensorBoard tags `downstream/<task>/<metric>`, metrics.jsonl records
{'step', 'split': 'downstream', '<task>/<metric>': value, 'seconds': time taken}. A resume drops the
records after its checkpoint with the rest, so each step is logged once. A task that cannot run on the
model (lm-eval's one-line errors, e.g. a continuation longer than the context) stops the downstream
evaluation with one line; the training and its checkpoints go on.
"""

from __future__ import annotations

import time
from typing import Callable

SPLIT = 'downstream'


def task_names(cfg) -> list[str]:
  """The run's eval_tasks, split at commas ([] = off)."""
  return [n.strip() for n in str(cfg.get('eval_tasks', '') or '').split(',') if n.strip()]


def every(cfg) -> int:
  """Steps between downstream evaluations: eval_tasks_every, else checkpoint_every, else the run's length."""
  return int(cfg.eval_tasks_every or cfg.checkpoint_every or cfg.steps)


def check(cfg) -> None:
  """One line unless lm-eval is installed and knows every name of eval_tasks (nothing compiled yet)."""
  names = task_names(cfg)
  if not names:
    return
  from fmjax.inference import lm_eval_errors, lm_eval_run  # pylint: disable=import-outside-toplevel
  lm_eval_errors.require_lm_eval()
  try:
    lm_eval_run.task_manager(names, builtin=False)   # fmjax's sanity tasks: quick
  except lm_eval_errors.UnknownTask:
    lm_eval_run.task_manager(names)   # perhaps lm-eval's own (its task index is slow to build)


def describe(cfg) -> list[str]:
  names = task_names(cfg)
  if not names:
    return []
  limit = f', {cfg.eval_tasks_limit} documents per task' if cfg.eval_tasks_limit else ''
  return [f'eval_tasks: {", ".join(names)} every {every(cfg)} steps and at the end{limit}']


class Downstream:
  """The run's task evaluator: `downstream(state, step)` scores the tasks and writes the split 'downstream'."""

  def __init__(self, session):
    from fmjax.inference import lm_eval_run  # pylint: disable=import-outside-toplevel
    cfg = session.cfg
    self.every, self._steps, self._writer = every(cfg), int(cfg.steps), session.writer
    model = lm_eval_run.for_run(session.run, cfg, session.tokenizer, session.start)
    self._evaluate = lm_eval_run.make_task_evaluator(model, task_names(cfg), limit=cfg.eval_tasks_limit or None,
                                                     batch_size=cfg.eval_tasks_batch_size)

  def due(self, step: int) -> bool:
    return not self.off and (step % self.every == 0 or step == self._steps)

  off = False   # set when a task cannot run on this model: training goes on, its checkpoints are kept

  def __call__(self, state, step: int) -> dict[str, float]:
    from fmjax.inference import lm_eval_errors  # pylint: disable=import-outside-toplevel
    started = time.perf_counter()
    try:
      metrics = self._evaluate(state.params)
    except lm_eval_errors.LmEvalError as e:   # e.g. a continuation longer than model.max_seq_len
      self.off = True
      self._writer.log(f'eval_tasks stopped at step {step}, training goes on: {e}')
      return {}
    scalars = {**metrics, 'seconds': time.perf_counter() - started}
    self._writer.write(step, scalars, prefix=SPLIT)
    return metrics


def evaluation(session, evaluate: Callable | None, eval_every: int) -> tuple[Callable | None, int | tuple[int, int]]:
  """The run's evaluation (evaluate(state, step) -> eval scalars; eval_every) with the downstream tasks added
  when eval_tasks names any: (evaluate, its periods) for the loop (fmjax/training/loop.py run_loop)."""
  if not task_names(session.cfg):
    return evaluate, eval_every
  downstream, total = Downstream(session), int(session.cfg.steps)

  def evaluate_both(state, step: int) -> dict:
    if downstream.due(step):
      downstream(state, step)
    if evaluate is not None and eval_every and (step % eval_every == 0 or step == total):
      return evaluate(state, step)
    return {}
  return evaluate_both, (eval_every, downstream.every)
