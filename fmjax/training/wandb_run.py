"""Weights & Biases beside TensorBoard and metrics.jsonl, when `metrics.wandb_project` is set.

The MetricWriter (process 0 only) sends W&B the same scalars as metrics.jsonl, under the TensorBoard
tags (`train/loss`, `eval/loss`, ...) and at the same step numbers. The run id is kept in
WORKDIR/wandb_run_id, so a resumed run continues the same W&B run. W&B's local files go to
$WANDB_DIR when set, else to WORKDIR/wandb (a local workdir), else to W&B's default (./wandb).
`metrics.wandb_mode` '' honours $WANDB_MODE (e.g. offline: `wandb sync WORKDIR/wandb/offline-run-*`
uploads later). W&B cannot rewrite a run's history: after a kill, the steps the killed run logged
past its last checkpoint keep their first values there (a deterministic resume logs the same losses).
"""

from __future__ import annotations

import os
import secrets
import string
import sys

from fmjax.errors import UserError
from fmjax.runtime import paths

RUN_ID_FILE = 'wandb_run_id'
MODES = ('online', 'offline', 'disabled')


class TrackerError(UserError):
  """W&B cannot be used as configured (missing package, bad mode, no login): one line naming the fix."""


class WandbRun:
  """One W&B run of a workdir: `log(step, values)` and `close()`."""

  def __init__(self, run, first_step: int):
    self.run = run
    self.first_step = first_step   # steps below it are already in W&B's history (an online resume)

  def log(self, step: int, values: dict[str, float]) -> None:
    """Record tagged scalars at `step` (W&B merges the calls of one step into one history row)."""
    if step >= self.first_step:
      self.run.log(values, step=step)

  def close(self) -> None:
    """Finish the run: failed when an exception is on its way out, else finished."""
    failed = sys.exc_info()[0] is not None
    self.run.finish(exit_code=1 if failed else 0)


def open_run(workdir: str, metrics, run_config: dict | None, log=print) -> WandbRun | None:
  """The workdir's W&B run (created, or resumed from WORKDIR/wandb_run_id); None when metrics.wandb_project is ''."""
  if not metrics or not metrics.get('wandb_project'):
    return None
  mode = metrics.get('wandb_mode') or None
  if mode is not None and mode not in MODES:
    raise TrackerError(f'metrics.wandb_mode={mode!r}: choose {", ".join(MODES)} or \'\' (honour $WANDB_MODE)')
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TrackerError("metrics.wandb_project is set but wandb is not installed: pip install 'fmjax[wandb]' (or set "
                       "metrics.wandb_project='')") from None
  id_path = paths.join(workdir, RUN_ID_FILE)
  run_id = paths.read_text(id_path).strip() if paths.exists(id_path) else ''
  resumed = bool(run_id)
  run_id = run_id or ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  # Given explicitly: W&B reads its environment once per process, and a process may run several (finetune --demo).
  local_dir = os.environ.get('WANDB_DIR') or (None if paths.is_url(workdir) else workdir)
  try:
    run = wandb.init(project=metrics.wandb_project, entity=metrics.get('wandb_entity') or None,
                     name=metrics.get('wandb_run_name') or paths.basename(workdir.rstrip('/')), id=run_id,
                     resume='allow', mode=mode or _env_mode(), dir=local_dir)
  except wandb.errors.Error as e:
    raise TrackerError(f'cannot start the W&B run {run_id} of project {metrics.wandb_project!r}: '
                       f'{" ".join(str(e).split()).rstrip(".")}; run `wandb login`, set WANDB_MODE=offline, or set '
                       "metrics.wandb_project=''") from None
  if run_config is not None:
    run.config.update(run_config, allow_val_change=True)
  if not resumed:
    paths.write_text(id_path, run_id + '\n')
  first = int(run.step or 0)
  if first:
    log(f'W&B run {run_id} already holds steps before {first}: those keep their logged values there')
  return WandbRun(run, first)


def _env_mode() -> str | None:
  """$WANDB_MODE when it names a mode (read at each run, see open_run); else None (W&B decides)."""
  mode = os.environ.get('WANDB_MODE', '')
  return mode if mode in MODES else None
