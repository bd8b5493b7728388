"""Running the stages: datatrove's LocalPipelineExecutor (N worker processes) or SlurmPipelineExecutor.

Each stage logs to OUT/.curate/logs/<stage>/ (task logs, stats/<rank>.json, completions/<rank>);
a stage whose tasks all completed is skipped, and a stage interrupted halfway reruns only its
unfinished tasks. datatrove's per-task console logging goes to OUT/.curate/logs/datatrove.log
unless --verbose. `--dry-run` with the SLURM executor prints the sbatch scripts it would submit
(datatrove renders them; nothing is submitted or written).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Iterator

import ml_collections
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.utils.logging import setup_default_logger

from fmjax.curate.report import ReportStep
from fmjax.curate.pipeline import Stage, work_dir
from fmjax.errors import UserError


class StageError(UserError):
  """A stage's task failed; rerunning the same command resumes after fixing the cause."""


def _tasks(n: int) -> str:
  return f'{n} task' + ('' if n == 1 else 's')


def local_workers(cfg: ml_collections.ConfigDict) -> int:
  """Worker processes of the local executor: config.workers, or min(tasks, CPUs)."""
  return cfg.workers or max(1, min(cfg.tasks, os.cpu_count() or 1))


@contextlib.contextmanager
def _stderr_to(path: str | None) -> Iterator[None]:
  """Send stderr (file descriptor 2 and sys.stderr: datatrove's loguru sinks, workers included) to `path`."""
  if path is None:
    yield
    return
  sys.stderr.flush()
  saved_fd, saved_stream = os.dup(2), sys.stderr
  with open(path, 'a') as log:
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    setup_default_logger()  # loguru's console sink follows sys.stderr
    try:
      yield
    finally:
      log.flush()
      sys.stderr = saved_stream
      os.dup2(saved_fd, 2)
      os.close(saved_fd)
      setup_default_logger()


def _first_error(logs: str) -> str:
  """'<task log>: <error>, reading <file>' from the ERROR line of a stage's task logs, if any."""
  found = ''
  folder = os.path.join(logs, 'logs')
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    reading = ''
    with open(os.path.join(folder, name), errors='replace') as f:
      for line in f:
        if 'Reading input file ' in line:
          reading = line.split('Reading input file ', 1)[1].rsplit(',', 1)[0].strip()
        if '| ERROR' in line:
          found = f'{name}: {line.split(" - ", 1)[-1].strip()}' + (f', reading {reading}' if reading else '')
  return found


def run_local(cfg: ml_collections.ConfigDict, stages: list[Stage], verbose: bool) -> None:
  """Run the stages one after the other on this machine, printing one line per stage."""
  workers = local_workers(cfg)
  log = None if verbose else work_dir(cfg, 'logs', 'datatrove.log')
  os.makedirs(work_dir(cfg, 'logs'), exist_ok=True)
  for i, stage in enumerate(stages, 1):
    logs = work_dir(cfg, 'logs', stage.name)
    executor = LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                     logging_dir=logs)
    todo = len(executor.get_incomplete_ranks())
    if not todo:
      print(f'[{i}/{len(stages)}] {stage.name}: {_tasks(stage.tasks)} already done', flush=True)
      continue
    start = time.time()
    try:
      with _stderr_to(log):
        executor.run()
    except Exception as e:  # noqa: BLE001 - a failed task becomes one line naming the stage and its log
      detail = _first_error(logs) or f'{type(e).__name__}: {e}'.splitlines()[0]
      raise StageError(f'stage {stage.name} failed ({detail}); logs in {logs}/logs; fix the cause and rerun '
                       'the same command to resume') from e
    done = stage.tasks - todo
    resumed = f', {done} done before' if done else ''
    print(f'[{i}/{len(stages)}] {stage.name}: {_tasks(todo)} in {time.time() - start:.1f}s{resumed}', flush=True)


def slurm_executors(cfg: ml_collections.ConfigDict, stages: list[Stage]) -> list[SlurmPipelineExecutor]:
  """One SlurmPipelineExecutor per stage (each depending on the one before), plus the report job."""
  s = cfg.slurm
  venv = os.environ.get('VIRTUAL_ENV') or (sys.prefix if sys.prefix != sys.base_prefix else None)
  report = Stage('report', [ReportStep(json.dumps(cfg.to_dict(), default=list))], 1)
  executors, previous = [], None
  for stage in stages + [report]:
    logs = work_dir(cfg, 'logs', stage.name)
    previous = SlurmPipelineExecutor(
        stage.pipeline, tasks=stage.tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
        mem_per_cpu_gb=s.mem_per_cpu_gb, job_name=f'{s.job_name}-{stage.name}', qos=s.qos,
        env_command=s.env_command or None, venv_path=None if s.env_command else (
            os.path.join(venv, 'bin', 'activate') if venv else None),
        max_array_size=s.max_array_size, depends=previous, logging_dir=logs,
        slurm_logs_folder=os.path.join(logs, 'slurm_logs'))
    executors.append(previous)
  return executors


def _missing_dirs(path: str) -> list[str]:
  """`path` and its ancestors that do not exist yet, deepest first."""
  missing = []
  while path and not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def render_sbatch(executor: SlurmPipelineExecutor) -> str:
  """The sbatch script datatrove would submit for this executor (the folders it creates are removed)."""
  created = _missing_dirs(executor.slurm_logs_folder)
  try:
    array = min(executor.tasks, executor.max_array_size) if executor.max_array_size != -1 else executor.tasks
    command = f'launch_pickled_pipeline {executor.logging_dir.resolve_paths("executor.pik")}'
    return executor.get_launch_file_contents(executor.get_sbatch_args(array), f'srun -l -n 1 {command}')
  finally:
    for path in created:
      with contextlib.suppress(OSError):
        os.rmdir(path)


def dry_run_slurm(cfg: ml_collections.ConfigDict, stages: list[Stage]) -> str:
  """What `--dry-run` prints for the SLURM executor: each job array, its dependency and its script."""
  executors = slurm_executors(cfg, stages)
  parts = [f'# fmjax.curate would submit {len(executors)} SLURM job arrays, each after the previous one:']
  for i, executor in enumerate(executors, 1):
    after = f' (after job {i - 1}: sbatch --dependency=afterok:<its id>)' if i > 1 else ''
    parts.append(f'\n# job {i}: {executor.job_name}, {_tasks(executor.tasks)}{after}\n{render_sbatch(executor)}')
  return '\n'.join(parts)


def dry_run_local(cfg: ml_collections.ConfigDict, stages: list[Stage]) -> str:
  """What `--dry-run` prints for the local executor: the stages and their blocks."""
  lines = [f'# fmjax.curate would run {len(stages)} stages locally with {local_workers(cfg)} worker processes:']
  for i, stage in enumerate(stages, 1):
    lines.append(f'{i}. {stage.name} ({_tasks(stage.tasks)}): ' + ' -> '.join(str(b) for b in stage.pipeline))
  return '\n'.join(lines)


def run_slurm(cfg: ml_collections.ConfigDict, stages: list[Stage], verbose: bool) -> bool:
  """Submit the job arrays of unfinished tasks (the last job writes the report); True if all had finished."""
  executors = slurm_executors(cfg, stages)
  if not any(e.get_incomplete_ranks() for e in executors):
    return True
  os.makedirs(work_dir(cfg, 'logs'), exist_ok=True)
  try:
    with _stderr_to(None if verbose else work_dir(cfg, 'logs', 'datatrove.log')):
      executors[-1].run()
  except Exception as e:  # noqa: BLE001 - sbatch missing or refusing the job
    raise StageError(f'submitting to SLURM failed ({type(e).__name__}: {e}); try --dry-run to see the jobs') from e
  print(f'submitted the SLURM job arrays of {len(executors)} stages; logs in {work_dir(cfg, "logs")}; the report '
        f'lands in {cfg.output} when the last one ends: rerun this command then to print it (not before: '
        'unfinished tasks would be submitted again)')
  return False
