"""Where metrics go: TensorBoard event files, a JSONL log, and a console progress bar.

Only process 0 writes; other processes get a writer that drops everything. A resumed run passes
`resume_step`: records after it are dropped from `metrics.jsonl` and TensorBoard purges them, so
the logs hold each step once. `metrics.jsonl` is strict JSON (NaN and infinities are written as
null). A write that fails (disk full) is one WorkdirWriteError line.

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

from fmjax.runtime import paths
from fmjax.checkpoints.store import WorkdirWriteError

FLUSH_SECONDS = 30.0  # TensorBoard events reach the disk at least this often (and at every `flush`)


class MetricWriter:
  """TensorBoard event file + `metrics.jsonl` in the workdir + tqdm progress bar."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, progress_bar: bool = True,
               enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = self._bar = None
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
      self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      self._tb = _EventFile(os.path.join(workdir, 'tensorboard'), None if resume_step is None else resume_step + 1)
    except OSError as e:
      raise _write_error(getattr(e, 'filename', None) or workdir, e) from None
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step or (resume_step or 0), dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0, unit='step')

  def write(self, step: int, scalars: dict, prefix: str = 'train') -> None:
    """Record scalars for a step (TensorBoard tags `prefix/name`)."""
    if not self.enabled or self._failed:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    record = {'step': step, 'split': prefix, **{k: _json_number(v) for k, v in scalars.items()}}
    self._guarded(self._append, self.path, json.dumps(record, allow_nan=False) + '\n')
    self._guarded(self._tb.scalars, self._tb.path, step, {f'{prefix}/{k}': v for k, v in scalars.items()})
    if time.monotonic() - self._tb.flushed_at > FLUSH_SECONDS:  # a live TensorBoard sees recent steps
      self.flush()
    if self._bar is not None:
      shown = {k: scalars[k] for k in ('loss', 'tokens_per_s', 'mfu', 'data_wait_share') if k in scalars}
      self._bar.set_postfix({k: (f'{v:.3g}' if k != 'tokens_per_s' else f'{v:,.0f}') for k, v in shown.items()},
                            refresh=False)
      if prefix != 'train':  # eval results reach the console with the bar too
        self.log(_console_line(step, scalars, prefix))
    elif prefix != 'train' or 'loss' in scalars:
      print(_console_line(step, scalars, prefix), flush=True)

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
    """Flush and close the files. Never raises (it runs in `finally` blocks): a failure is one warning line."""
    if not self.enabled or self._fd < 0:
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


class _EventFile:
  """TensorBoard scalars written synchronously with tensorboardX's EventsWriter: `flush` means on disk, and a
  failed write raises here rather than killing a background thread (whose queue then blocks the run)."""

  def __init__(self, directory: str, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter  # imported lazily: only process 0 needs it
    from tensorboardX.proto import event_pb2, summary_pb2
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(directory, exist_ok=True)
    self._events = EventsWriter(os.path.join(directory, 'events'), f'.{os.getpid()}.{time.time_ns() % 10**9}')
    self.path = self._events._file_name  # pylint: disable=protected-access
    self._closed = False
    self.flushed_at = time.monotonic()
    if purge_step is not None:  # TensorBoard drops the earlier files' events at steps >= purge_step
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._events.write_event(event_pb2.Event(step=purge_step, wall_time=time.time(), session_log=start))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One event holding every scalar of a step."""
    summary = self._summary_pb2.Summary(
        value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
    self._events.write_event(self._event_pb2.Event(step=step, wall_time=time.time(), summary=summary))

  def image(self, step: int, tag: str, pixels) -> None:
    """One event holding a PNG-encoded image."""
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel
    event = self._event_pb2.Event(step=step, wall_time=time.time(),
                                  summary=summary.image(tag, pixels, dataformats='HWC'))
    self._events.write_event(event)

  def flush(self) -> None:
    self._events.flush()
    self.flushed_at = time.monotonic()

  def close(self, quiet: bool = False) -> None:
    if self._closed:
      return
    self._closed = True
    try:
      self._events.close()
    except OSError:
      if not quiet:
        raise


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


def _console_line(step: int, scalars: dict, prefix: str) -> str:
  text = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items())
  return f'[{prefix}] step {step}: {text}'


def _write_error(path: str, e: OSError) -> WorkdirWriteError:
  reason = (e.strerror or str(e)).lower()
  todo = 'free disk space' if 'space' in reason or 'quota' in reason else 'make the workdir writable'
  return WorkdirWriteError(f'cannot write the run log {path}: {reason}; {todo} and rerun (the run resumes '
                           'from its last checkpoint)')
