"""Where metrics go: TensorBoard event files, a JSONL log, a console progress bar, and W&B when configured.

Only process 0 writes; other processes get a writer that drops everything. A resumed run passes
`resume_step`: records after it are dropped from `metrics.jsonl` and from the earlier TensorBoard
event files (fmjax/training/event_files.py), so the logs hold each step once. With
`metrics.wandb_project` set, the same scalars go to Weights & Biases (fmjax/training/wandb_run.py).
The progress bar shows the train `loss=` and the last eval's as `eval_loss=`. `metrics.jsonl` is
strict JSON (NaN and infinities are written as null). A write that fails (disk full) is one
WorkdirWriteError line.

A remote workdir (gs://...) cannot be appended to: both files are kept in a local staging directory
and uploaded whole at every `flush` (each checkpoint, and at least every FLUSH_SECONDS) and at `close`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

import jax

from fmjax.checkpoints.store import WorkdirWriteError
from fmjax.runtime import paths
from fmjax.training import event_files, wandb_run

FLUSH_SECONDS = 30.0  # TensorBoard events reach the disk at least this often (and at every `flush`)
POSTFIX_TRAIN = ('loss', 'tokens_per_s', 'mfu', 'data_wait_share')   # train scalars the progress bar shows


class MetricWriter:
  """TensorBoard event file + `metrics.jsonl` in the workdir + tqdm progress bar (+ W&B).

  `config` is the run's config: its `metrics` section turns W&B on, and W&B records the whole of it.
  """

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, progress_bar: bool = True,
               enabled: bool | None = None, resume_step: int | None = None, config=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = self._bar = self._wandb = None
    self.postfix: dict[str, str] = {}   # what the progress bar shows after the counter
    self._fd = -1
    self._failed = False
    self._remote = workdir if paths.is_url(workdir) else None   # uploaded to at each flush
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not self.enabled:
      return
    try:
      if self._remote:
        workdir = tempfile.mkdtemp(prefix='fmjax-run-log-')
        self.path = os.path.join(workdir, 'metrics.jsonl')
        if paths.exists(paths.join(self._remote, 'metrics.jsonl')):
          paths.copy(paths.join(self._remote, 'metrics.jsonl'), self.path)
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None:
        keep_steps_up_to(self.path, resume_step)
        tensorboard = paths.join(self._remote or workdir, 'tensorboard')
        event_files.drop_steps_after(tensorboard, resume_step)
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      self._tb = event_files.EventFile(os.path.join(workdir, 'tensorboard'),
                                       None if resume_step is None else resume_step + 1)
    except OSError as e:
      raise _write_error(getattr(e, 'filename', None) or workdir, e) from None
    metrics = config.get('metrics') if config is not None else None
    run_config = config.to_dict() if config is not None and hasattr(config, 'to_dict') else None
    try:
      self._wandb = wandb_run.open_run(self._remote or workdir, metrics, run_config, self.log)
    except BaseException:
      self._close_files()
      raise
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step or (resume_step or 0), dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0, unit='step')

  def write(self, step: int, scalars: dict, prefix: str = 'train', console: bool = True) -> None:
    """Record scalars for a step (TensorBoard and W&B tags `prefix/name`); `console=False` keeps a non-train
    split's line off the console (the files get it all the same)."""
    if not self.enabled or self._failed:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    record = {'step': step, 'split': prefix, **{k: _json_number(v) for k, v in scalars.items()}}
    tagged = {f'{prefix}/{k}': v for k, v in scalars.items()}
    self._guarded(self._append, self.path, json.dumps(record, allow_nan=False) + '\n')
    self._guarded(self._tb.scalars, self._tb.path, step, tagged)
    if self._wandb is not None:
      self._wandb.log(step, tagged)
    if time.monotonic() - self._tb.flushed_at > FLUSH_SECONDS:  # a live TensorBoard sees recent steps
      self.flush()
    self._update_postfix(scalars, prefix)
    if self._bar is not None:
      if prefix != 'train' and console:  # eval results reach the console with the bar too
        self.log(_console_line(step, scalars, prefix))
    elif (prefix != 'train' and console) or (prefix == 'train' and 'loss' in scalars):
      print(_console_line(step, scalars, prefix), flush=True)

  def _update_postfix(self, scalars: dict, prefix: str) -> None:
    """The bar's postfix: the train split's loss and speed, the last eval's loss beside them as eval_loss."""
    if prefix == 'train':
      shown = {k: scalars[k] for k in POSTFIX_TRAIN if k in scalars}
    elif prefix == 'eval' and 'loss' in scalars:
      shown = {'eval_loss': scalars['loss']}
    else:
      return
    self.postfix.update({k: (f'{v:,.0f}' if k == 'tokens_per_s' else f'{v:.3g}') for k, v in shown.items()})
    if self._bar is not None:
      self._bar.set_postfix(self.postfix, refresh=False)

  def image(self, tag: str, pixels, step: int) -> None:
    """Record an RGB image (uint8, height x width x 3) in TensorBoard under `tag`."""
    if not self.enabled or self._failed:
      return
    self._guarded(self._tb.image, self._tb.path, step, tag, pixels)

  def advance(self, step: int) -> None:
    """Move the progress bar to `step`."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def log(self, text: str) -> None:
    """A console line (through the bar when there is one)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, flush=True)

  def flush(self) -> None:
    """Put everything written so far on disk (call it when a checkpoint is saved)."""
    if self.enabled and not self._failed:
      self._guarded(self._tb.flush, self._tb.path)
      if self._remote:
        self._guarded(self._upload, self._remote)

  def _upload(self) -> None:
    """Copy the staged files to the remote workdir (whole: object stores cannot append)."""
    paths.copy(self.path, paths.join(self._remote, 'metrics.jsonl'))
    paths.copy(self._tb.path, paths.join(self._remote, 'tensorboard', os.path.basename(self._tb.path)))

  def close(self) -> None:
    """Flush and close the files and the W&B run. Never raises (it runs in `finally` blocks): a failure is one
    warning line."""
    if not self.enabled or self._fd < 0:
      return
    if self._wandb is not None:
      wandb, self._wandb = self._wandb, None
      try:
        wandb.close()
      except Exception as e:  # pylint: disable=broad-except  # the local logs are complete without it
        print(f'warning: the W&B run did not finish cleanly: {e}', file=sys.stderr, flush=True)
    self._close_files()

  def _close_files(self) -> None:
    if self._fd < 0:
      return
    if self._bar is not None:
      self._bar.close()
    os.close(self._fd)
    self._fd = -1
    try:
      self._tb.close(quiet=self._failed)
      if self._remote and not self._failed:
        self._upload()
    except OSError as e:
      print(f'warning: the TensorBoard log {self._tb.path} may miss its last steps: '
            f'{(e.strerror or str(e)).lower()}', file=sys.stderr, flush=True)
    if self._remote:
      shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

  def _append(self, text: str) -> None:
    """Append a whole line or nothing: a failed write is cut back so the file stays valid JSON lines."""
    data = text.encode()
    size = os.fstat(self._fd).st_size
    try:
      while data:
        data = data[os.write(self._fd, data):]
    except OSError:
      try:
        os.ftruncate(self._fd, size)
      except OSError:
        pass
      raise

  def _guarded(self, fn, path: str, *args) -> None:
    """Run a write; an OSError stops all further writes and becomes one WorkdirWriteError line."""
    try:
      fn(*args)
    except OSError as e:
      self._failed = True
      self._tb.close(quiet=True)
      raise _write_error(path, e) from None


def keep_steps_up_to(path: str, last_step: int) -> int:
  """Rewrite a metrics.jsonl keeping only records with step <= last_step (atomic); returns how many were
  dropped. Torn lines (a kill mid-write) are dropped; NaN from older files becomes null."""
  if not os.path.exists(path):
    return 0
  kept, dropped, changed = [], 0, False
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      try:
        record = json.loads(line)
        keep = isinstance(record, dict) and int(record['step']) <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        clean = {k: _json_number(v) if isinstance(v, float) else v for k, v in record.items()}
        kept.append(json.dumps(clean, allow_nan=False) + '\n')
        changed = changed or kept[-1] != line
      else:
        dropped += 1
  if dropped or changed:
    paths.write_text(path, ''.join(kept))   # atomic: the old log or the new, never a torn one
  return dropped


def _json_number(v: float) -> float | None:
  """A float JSON can hold: NaN and +-inf become null (the key stays)."""
  return v if math.isfinite(v) else None


CONSOLE_HIDDEN = 'layers/'   # per-layer scalars (MoE routing): TensorBoard and metrics.jsonl only


def _console_line(step: int, scalars: dict, prefix: str) -> str:
  text = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items() if not k.startswith(CONSOLE_HIDDEN))
  return f'[{prefix}] step {step}: {text}'


def _write_error(path: str, e: OSError) -> WorkdirWriteError:
  reason = (e.strerror or str(e)).lower()
  todo = 'free disk space' if 'space' in reason or 'quota' in reason else 'make the workdir writable'
  return WorkdirWriteError(f'cannot write the run log {path}: {reason}; {todo} and rerun (the run resumes '
                           'from its last checkpoint)')
