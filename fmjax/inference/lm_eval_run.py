"""Run lm-eval tasks on an fmjax model: by name, offline, in-process or from `python -m fmjax.lm_eval`.

    metrics = run_tasks(fmjax.api.load(WORKDIR), ['fmjax_sanity'], limit=100)   # {'task/metric': value}
    evaluate_tasks = make_task_evaluator(for_run(run, cfg, tokenizer), ['fmjax_sanity'], limit=200)
    evaluate_tasks(state.params)               # in a training loop, at checkpoints: compiled once, reused

Task names are looked up in fmjax's shipped sanity tasks (fmjax/inference/lm_eval_tasks), then the
`include_path` folders, and only when a name is in neither, in lm-eval's own task index (slow to build,
and its datasets need the Hugging Face hub or its cache). An unknown name, or a task whose data files
are missing, is a one-line error. `task_metadata` reaches the tasks (the sanity tasks read `cache_dir`
and `validation_fraction`; run_tasks passes the checkpoint's own fraction when it trained on stdlib).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from typing import Callable, Sequence

from fmjax.inference import lm_eval_errors as errors

log = logging.getLogger(__name__)


class _QuietCustomDataset(logging.Filter):
  """Drops lm-eval's advice about --metadata, printed for every task that builds its own dataset."""

  def filter(self, record):
    return 'Custom kwargs can be passed' not in record.getMessage()


def _task_dirs(include_path) -> list[str]:
  from fmjax.inference.lm_eval_tasks import TASKS_DIR  # pylint: disable=import-outside-toplevel
  extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
  for folder in extra:
    if not os.path.isdir(folder):
      raise errors.UnknownTask(f'--include-path {folder} is not a directory of task YAML files')
  return [TASKS_DIR] + [os.path.abspath(p) for p in extra]


def task_manager(names: Sequence[str], include_path=None, metadata: dict | None = None, builtin: bool = True):
  """A lm_eval TaskManager that knows every name in `names` (else UnknownTask, naming close matches); with
  `builtin`, lm-eval's own tasks are indexed too when a name is not among fmjax's and include_path's."""
  errors.require_lm_eval()
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  logging.getLogger('lm_eval.api.task').addFilter(_QuietCustomDataset())
  dirs = _task_dirs(include_path)
  manager = TaskManager(include_path=dirs, include_defaults=False, metadata=dict(metadata or {}))
  if builtin and _unknown(manager, names):
    log.info('looking for %s among lm-eval\'s own tasks (building its task index)', ', '.join(_unknown(manager, names)))
    manager = TaskManager(include_path=dirs, include_defaults=True, metadata=dict(metadata or {}))
  missing = _unknown(manager, names)
  if missing:
    close = difflib.get_close_matches(missing[0], manager.all_tasks, n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    where = ', lm-eval\'s tasks' if builtin else ''
    raise errors.UnknownTask(f'unknown lm-eval task {missing[0]!r}: no task, group or tag of that name in fmjax\'s '
                             f'sanity tasks (e.g. fmjax_sanity){where} or --include-path{hint}')
  return manager


def _unknown(manager, names: Sequence[str]) -> list[str]:
  known = set(manager.all_tasks)
  return [n for n in names if n not in known and not manager.match_tasks([n])
          and not (n.endswith('.yaml') and os.path.isfile(n))]


def _load(manager, names: Sequence[str]) -> dict:
  """The loaded tasks; a task whose data cannot be found is a TaskDataMissing naming it."""
  try:
    return manager.load(list(names))
  except FileNotFoundError as e:
    culprit = next((n for n in names if not _loads(manager, n)), ', '.join(names))
    raise errors.TaskDataMissing(f'task {culprit} cannot find its data: {str(e).splitlines()[0]} (check '
                                 'dataset_path / dataset_kwargs.data_files in its YAML)') from None


def _loads(manager, name: str) -> bool:
  try:
    manager.load([name])
  except FileNotFoundError:
    return False
  return True


def evaluate(lm, names: Sequence[str], *, num_fewshot: int | None = None, limit: float | None = None,
             include_path=None, task_metadata: dict | None = None, bootstrap_iters: int = 1000,
             gen_kwargs: str | dict | None = None, log_samples: bool = True, manager=None) -> dict:
  """lm-eval's results dict ('results', 'samples', 'configs', ...) of `names` on `lm` (any lm-eval LM)."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  names = [n for n in names if n]
  if not names:
    raise errors.UnknownTask('no tasks given: pass --tasks NAME[,NAME...] (e.g. fmjax_sanity)')
  manager = manager or task_manager(names, include_path, task_metadata)
  os.environ.setdefault('DISABLE_MULTIPROC', '1')   # lm-eval's bootstrap would fork this (multithreaded) JAX process
  return lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                 task_manager=_Checked(manager), bootstrap_iters=bootstrap_iters,
                                 gen_kwargs=gen_kwargs, log_samples=log_samples)


class _Checked:
  """The TaskManager, loading tasks through `_load` (so missing data files are one line naming the task)."""

  def __init__(self, manager):
    self._manager = manager

  def load(self, names):
    return _load(self._manager, names)

  def __getattr__(self, name):
    return getattr(self._manager, name)


def flat_metrics(results: dict) -> dict[str, float]:
  """{'task/metric': value} of lm-eval's results (metric names without the ',none' filter; stderrs left out)."""
  out = {}
  for task, metrics in results.get('results', {}).items():
    for key, value in metrics.items():
      if '_stderr' in key or not isinstance(value, (int, float)) or isinstance(value, bool) or ',' not in key:
        continue
      metric, filter_name = key.split(',', 1)
      out[f'{task}/{metric}' + ('' if filter_name == 'none' else f'_{filter_name}')] = float(value)
  return out


def stdlib_metadata(restored) -> dict:
  """Task metadata for the sanity tasks: the fraction of the stdlib corpus the model held out, if it read it."""
  data = restored.cfg.data
  return {'validation_fraction': float(data.validation_fraction)} if data.source == 'stdlib' else {}


def for_run(run, cfg, tokenizer, step: int = 0):
  """A restored-model view of a live training run (its Run: model, mesh, rules; its config and tokenizer),
  for make_task_evaluator: no checkpoint is read, and the parameters come with each call."""
  from fmjax.checkpoints.restore import Restored  # pylint: disable=import-outside-toplevel
  return Restored(cfg=cfg, meta={'seq_len': int(cfg.seq_len)}, step=int(step), tokenizer=tokenizer, run=run,
                  params=None)


def make_task_evaluator(model, names: Sequence[str], **options) -> Callable[..., dict[str, float]]:
  """`evaluate(params=None) -> {'task/metric': value}` on a restored model (fmjax.api.load / checkpoints.restore),
  built once: compiled programs and loaded task documents are reused across calls with new `params` of the
  same shapes and shardings (e.g. a training state's). Options: those of FmjaxLM (batch_size, max_length,
  buckets, max_gen_toks, ...) and of `evaluate` (num_fewshot, limit, include_path, task_metadata,
  bootstrap_iters, gen_kwargs)."""
  errors.require_lm_eval()
  from fmjax.inference.lm_eval_backend import FmjaxLM  # pylint: disable=import-outside-toplevel
  run_keys = ('num_fewshot', 'limit', 'include_path', 'task_metadata', 'bootstrap_iters', 'gen_kwargs')
  run_options = {k: options.pop(k) for k in run_keys if k in options}
  restored = getattr(model, 'restored', model)
  metadata = stdlib_metadata(restored) | dict(run_options.pop('task_metadata', None) or {})
  manager = task_manager(names, run_options.pop('include_path', None), metadata)
  lm = FmjaxLM(lm=restored, **options)

  def evaluate_tasks(params=None) -> dict[str, float]:
    if params is None and restored.params is None:
      raise errors.BackendArgumentError('no parameters: pass evaluate_tasks(params) (for_run views hold none)')
    lm.runner.params = restored.params if params is None else params
    return flat_metrics(evaluate(lm, names, manager=manager, log_samples=False, **run_options))
  return evaluate_tasks


def run_tasks(model, names: Sequence[str], params=None, **options) -> dict[str, float]:
  """{'task/metric': value} of lm-eval tasks on `model` (a restored model or LanguageModel, or a workdir
  path), with `params` in place of its own if given; options as make_task_evaluator."""
  if isinstance(model, str):
    from fmjax.inference import api  # pylint: disable=import-outside-toplevel
    model = api.load(model)
  return make_task_evaluator(model, names, **options)(params)


def write_outputs(results: dict, out: str) -> tuple[str, str]:
  """lm-eval's results (without samples) as JSON at `out`, and every logged sample as JSONL beside it
  (`<out without .json>.samples.jsonl`). Returns both paths."""
  from lm_eval.utils import handle_non_serializable  # pylint: disable=import-outside-toplevel
  from fmjax.runtime import paths  # pylint: disable=import-outside-toplevel
  body = {k: v for k, v in results.items() if k != 'samples'}
  stem = out[:-len('.json')] if out.endswith('.json') else out
  samples_path = f'{stem}.samples.jsonl'
  folder = paths.dirname(out)
  if folder:
    paths.makedirs(folder)
  paths.write_text(out, json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False) + '\n')
  lines = []
  for task, samples in (results.get('samples') or {}).items():
    for sample in samples:
      lines.append(json.dumps({'task': task, **sample}, default=handle_non_serializable, ensure_ascii=False))
  paths.write_text(samples_path, ''.join(line + '\n' for line in lines))
  return out, samples_path


def run_command(args, overrides: Sequence[str]) -> int:
  """`python -m fmjax.lm_eval` after its flags are parsed (fmjax/lm_eval.py)."""
  errors.require_lm_eval()
  import jax  # pylint: disable=import-outside-toplevel
  from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
  from fmjax.inference import api  # pylint: disable=import-outside-toplevel
  from fmjax.inference.lm_eval_backend import FmjaxLM  # pylint: disable=import-outside-toplevel
  names = [n.strip() for n in args.tasks.split(',') if n.strip()]
  if not names:
    raise errors.UnknownTask('no tasks given: pass --tasks NAME[,NAME...] (e.g. fmjax_sanity)')
  try:   # names among fmjax's tasks and --include-path are checked before the checkpoint is read
    task_manager(names, args.include_path, builtin=False)
    builtin = False
  except errors.UnknownTask:
    builtin = True   # perhaps lm-eval's own: its (slow) index is built once, below
  overrides = list(overrides) + ([f'model.dtype={args.dtype}'] if args.dtype else [])
  restored = api.load(args.workdir, overrides, args.step, args.mesh).restored
  manager = task_manager(names, args.include_path, stdlib_metadata(restored), builtin=builtin)
  lm = FmjaxLM(lm=restored, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
               buckets=not args.no_buckets)
  limit = None if args.limit is None else (int(args.limit) if float(args.limit).is_integer() else float(args.limit))
  results = evaluate(lm, names, num_fewshot=args.num_fewshot, limit=limit, bootstrap_iters=args.bootstrap_iters,
                     gen_kwargs=args.gen_kwargs, manager=manager)
  if jax.process_index() != 0:
    return 0
  print(make_table(results))
  if results.get('groups'):
    print(make_table(results, 'groups'))
  from fmjax.runtime import paths  # pylint: disable=import-outside-toplevel
  out = args.out or paths.join(paths.resolve(args.workdir), 'lm_eval', f'results_step{restored.step}.json')
  out, samples = write_outputs(results, out)
  print(f'wrote {out} and {samples} (checkpoint step {restored.step}; {lm.runner.compiles} compiles, '
        f'{lm.runner.compile_seconds:.1f}s)')
  return 0
