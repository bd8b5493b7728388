"""The training loop shared by `fmjax.train` and `fmjax.finetune`.

The host never waits on the device inside the loop: metrics of step n are read after step n+1
is dispatched (its `nonfinite` flag every step, the rest every `log_every` steps). Checkpoints
are saved asynchronously every `checkpoint_every` steps and at the end; SIGTERM (preemption) or
Ctrl-C finishes the current step, saves, waits for the save and returns (a second Ctrl-C aborts at
once, see `PreemptionWatch`). Before an evaluation or a save
the step is checked to be finite (fmjax/training/numerics.py), and the time spent evaluating and saving is
left out of the throughput window.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.parallel import sharding as shd
from fmjax.perf import flops as metrics_lib
from fmjax.training import numerics


@dataclass
class LoopResult:
  """What a finished (or preempted) loop leaves behind."""
  state: Any
  last_step: int
  preempted: bool = False           # stopped early by SIGTERM or Ctrl-C, after saving a checkpoint
  history: list = field(default_factory=list)   # [(step, {metric: value})] as logged
  interrupted: bool = False         # the stop was a Ctrl-C (the command exits with 130)


class PreemptionWatch:
  """Notices SIGTERM (preemption) and Ctrl-C (SIGINT); in multi-process runs all processes agree on the
  step to stop at.

  While armed (during the loop) SIGTERM or a first Ctrl-C asks to save at the next step boundary and
  stop. One process: Python handlers. Several: JAX's preemption sync manager (started by
  `jax.distributed.initialize`, see fmjax/runtime/distributed.py) catches SIGTERM in whichever process gets
  it and tells the others (a Ctrl-C is passed on to it as a SIGTERM to this process); every process stops
  at the same step, which all of them save. Unarmed (set-up, end of run) a Ctrl-C raises
  KeyboardInterrupt as usual.

  A second Ctrl-C, armed or not, aborts at once: a thread woken by the signal itself (signal.set_wakeup_fd,
  so a main thread busy in XLA or in a save does not delay it) prints the line `on_abort()` returns and
  exits with 130 without waiting for a save in progress. Orbax finalises a save atomically, so the last
  complete checkpoint stays the latest. Must be asked at every step, with the same step numbers in every
  process.
  """

  EXIT_CODE = 130   # 128 + SIGINT, what shells report for Ctrl-C

  def __init__(self, on_abort: Callable[[], str] | None = None, exit: Callable[[int], None] = os._exit):
    self.requested = False      # stop at the next step boundary
    self.interrupted = False    # ... because of a Ctrl-C
    self.on_abort = on_abort
    self._exit = exit
    self._multi = jax.process_count() > 1
    self._saved: dict = {}      # signal -> its handler before arm()
    self._pipe = self._thread = None
    self._wakeup = -1
    self._start_abort_thread()

  def _start_abort_thread(self) -> None:
    if threading.current_thread() is not threading.main_thread() or not _catches_sigint():
      return   # handlers can only be set from the main thread; an ignored SIGINT (a background job) stays so
    read, write = os.pipe()
    os.set_blocking(write, False)
    self._wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    self._pipe = (read, write)
    self._thread = threading.Thread(target=self._count_interrupts, name='fmjax-second-ctrl-c', daemon=True)
    self._thread.start()

  def _count_interrupts(self) -> None:
    """The abort thread: one byte per caught signal arrives on the pipe; a 0 byte means closed."""
    count = 0
    while True:
      try:
        data = os.read(self._pipe[0], 64)
      except OSError:
        return
      if not data or 0 in data:
        return
      count += data.count(signal.SIGINT)
      if count >= 2:
        self._abort()
        return

  def _abort(self) -> None:
    line = 'fmjax: aborted by a second Ctrl-C'
    try:
      if self.on_abort is not None:
        line = self.on_abort()
    except Exception as e:  # noqa: BLE001 - abort anyway, saying what failed
      line += f' ({type(e).__name__}: {e})'
    try:
      sys.stdout.flush()
      print(line, file=sys.stderr, flush=True)
    finally:
      self._exit(self.EXIT_CODE)

  def arm(self) -> None:
    """From now on SIGTERM and a first Ctrl-C ask to stop at the next step boundary."""
    handlers = {signal.SIGINT: self._on_interrupt} if _catches_sigint() else {}
    if not self._multi:
      handlers[signal.SIGTERM] = self._on_terminate
    for signum, handler in handlers.items():
      try:
        self._saved[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread
        pass

  def disarm(self) -> None:
    """Back to the handlers from before `arm` (a Ctrl-C raises KeyboardInterrupt again)."""
    for signum, previous in self._saved.items():
      signal.signal(signum, previous)
    self._saved = {}

  def _on_terminate(self, signum, frame):
    self.requested = True

  def _on_interrupt(self, signum, frame):
    if self.interrupted:
      return   # the second one: the abort thread handles it
    self.interrupted = True
    if self._multi:   # JAX's preemption sync decides the step all processes stop at
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer in every process)."""
    stop = multihost_utils.reached_preemption_sync_point(step) if self._multi else self.requested
    if stop and self._multi:  # on every process (the writer logs on process 0 only)
      print(f'fmjax: process {jax.process_index()}: preemption: saving at step {step} and stopping',
            file=sys.stderr, flush=True)
    return stop

  def stop_line(self, step: int) -> str:
    """The one line logged once the stop's checkpoint is written."""
    if self.interrupted:
      return f'interrupted (Ctrl-C): checkpoint at step {step} written, exiting; rerun the same command to resume'
    return f'preemption requested: checkpoint at step {step} written, exiting'

  def close(self) -> None:
    """Disarm and stop the abort thread (the wakeup fd before it is restored)."""
    self.disarm()
    if self._pipe is None:
      return
    signal.set_wakeup_fd(self._wakeup)
    read, write = self._pipe
    self._pipe = None
    try:
      os.write(write, b'\0')
    except OSError:
      pass
    self._thread.join(timeout=5)
    os.close(write)
    os.close(read)


def _catches_sigint() -> bool:
  """Whether Python handles SIGINT here (not ignored, e.g. in a background job, or left to the OS)."""
  return signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.SIG_DFL, None)


def to_global(batch: dict, sharding) -> dict:
  """A process-local numpy batch -> global jax arrays sharded on the batch axis (processes that hold the
  same rows feed the same part: `sharding.batch_feed`)."""
  out = {}
  parts = shd.batch_feed(sharding)[1] if jax.process_count() > 1 else 1
  for k, v in batch.items():
    v = np.asarray(v)
    global_shape = (v.shape[0] * parts,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


class DataWait:
  """Times the host's wait in `next(batches)`: per-step mean and share of the step time, logged with
  the train metrics (with per-source tokens of a data.mixture), and one warning when noticeable."""

  WARN_SHARE = 0.1      # warn when the wait is this share of the train time ...
  WARN_AFTER = 20       # ... over this many steps after the first logged window (compilation, warm-up)

  def __init__(self, batches: Iterator[dict], seq_len: int, log: Callable[[str], None],
               clock: Callable[[], float] = time.perf_counter):
    self._batches, self._seq_len, self._log, self._clock = batches, seq_len, log, clock
    self._waited, self._warned, self._windows = 0.0, False, 0
    self._total = [0.0, 0.0, 0]   # wait, train seconds, steps after the first window

  def next(self) -> dict:
    started = self._clock()
    batch = next(self._batches)
    self._waited += self._clock() - started
    return batch

  def metrics(self, step: int, steps: int, seconds: float) -> dict:
    """The wait over the last `steps` steps (`seconds` of train time), as `data_wait_s` (per step)
    and `data_wait_share`; and the tokens each mixture source gave up to `step`."""
    share = min(self._waited / max(seconds, 1e-9), 1.0)
    out = {'data_wait_s': self._waited / steps, 'data_wait_share': share}
    if self._windows:
      self._total = [self._total[0] + self._waited, self._total[1] + seconds, self._total[2] + steps]
    self._waited, self._windows = 0.0, self._windows + 1
    wait, total, counted = self._total
    if not self._warned and counted >= self.WARN_AFTER and wait > self.WARN_SHARE * total:
      self._warned = True
      self._log(f'the host waited for input data {wait / total:.0%} of the train time over {counted} '
                f'steps (to step {step}): raise data.worker_count (tokenizing processes), use a faster '
                'tokenizer, or pre-tokenize')
    rows_at = getattr(self._batches, 'rows_seen_at', None)
    for name, rows in (rows_at(step) if rows_at else {}).items():
      out[f'data_tokens/{name}'] = float(rows * self._seq_len)
    return out


def _due(step: int, every, last: bool) -> bool:
  """Whether `evaluate` runs after `step`: `every` is a period, or several (each evaluation's; 0 = none), and
  any evaluation runs at the last step."""
  periods = [p for p in (every if isinstance(every, (tuple, list)) else (every,)) if p]
  return bool(periods) and (last or any(step % p == 0 for p in periods))


def run_loop(*, train_step: Callable, state, batches: Iterator[dict], batch_sharding, start_step: int,
             total_steps: int, writer, model_cfg, seq_len: int, tokens_per_step: int, log_every: int,
             checkpoint_every: int = 0, save: Callable[[int, Any, bool], None] | None = None,
             evaluate: Callable[[Any, int], dict] | None = None, eval_every: int | tuple[int, ...] = 0,
             cpu_peak_flops: float = 0.0, compute_dtype: str = 'float32',
             guards: numerics.GuardConfig | None = None, watch: PreemptionWatch | None = None) -> LoopResult:
  """Run steps `start_step+1 .. total_steps`. `save(step, state, wait)` writes a checkpoint.

  `evaluate(state, step)` runs every `eval_every` steps (or at each of several periods) and at the end; its
  scalars, if any, are written as the split 'eval' (it may write other splits itself, before the save).
  `watch` (the run's, armed for the loop; default: one for this loop) says when SIGTERM or Ctrl-C asks
  to stop. Raises numerics.NonFiniteError at the first non-finite step (beyond
  `guards.skip_nonfinite_steps`) without saving it; checkpoints saved before stay valid.
  """
  platform = jax.devices()[0].platform
  # On CPU the (possibly forced) devices of a process share one processor: count hosts.
  flop_devices = jax.process_count() if platform == 'cpu' else jax.device_count()
  peak = metrics_lib.device_peak_flops(jax.devices()[0], cpu_peak_flops, compute_dtype)
  guards = guards or numerics.GuardConfig()
  guard = numerics.NumericsGuard(guards, jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec()),
                                 writer.log)
  monitor = numerics.DivergenceMonitor(guards.divergence_factor, guards.grad_spike_factor, guards.warmup_steps)
  own_watch = watch is None
  watch = watch or PreemptionWatch()
  watch.arm()
  result = LoopResult(state=state, last_step=start_step)
  pending = None                       # (step, device metrics) of the step before the current one
  mark_time, mark_step = time.perf_counter(), start_step
  paused = 0.0                         # seconds spent in eval/save since the mark: not train time
  data_wait = DataWait(batches, seq_len, writer.log)
  step = start_step

  def report(step_done: int, device_metrics) -> None:
    nonlocal mark_time, mark_step, paused
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    host.pop('nonfinite', None)
    if guards.skip_nonfinite_steps:
      host['skipped_steps'] = float(len(guard.skipped))
    now = time.perf_counter()
    steps = step_done - mark_step
    if steps > 0:
      seconds = max(now - mark_time - paused, 1e-9)
      host.update(metrics_lib.throughput(model_cfg, seq_len, steps * tokens_per_step, seconds, flop_devices, peak))
      host['step_time'] = seconds / steps
      host.update(data_wait.metrics(step_done, steps, seconds))
    mark_time, mark_step, paused = now, step_done, 0.0
    for warning in monitor.update(step_done, host):
      writer.log(warning)
    writer.write(step_done, host)
    result.history.append((step_done, host))

  try:
    while step < total_steps:
      batch = to_global(data_wait.next(), batch_sharding)
      state, device_metrics = train_step(state, batch)
      step += 1
      if pending is not None:  # step n-1 is done when step n is queued: at most two in flight
        jax.block_until_ready(pending[1])
        guard.check_step(*pending)
        if pending[0] % log_every == 0:
          report(*pending)
      pending = (step, device_metrics)
      writer.advance(step)
      last = step == total_steps
      do_eval = evaluate is not None and _due(step, eval_every, last)
      stop = watch.should_stop(step)
      do_save = save is not None and (stop or last or (checkpoint_every and step % checkpoint_every == 0))
      if do_eval or do_save:
        guard.check_step(step, device_metrics)   # waits for the step: what follows is not train time
        if step % log_every == 0 or last or stop:  # logged now, so a checkpoint never precedes its step's record
          report(step, device_metrics)
          pending = None
        started = time.perf_counter()
        guard.check_state(step, state)
        if do_eval:
          scalars = evaluate(state, step)
          if scalars:   # an evaluation with several schedules may have nothing for the split 'eval'
            writer.write(step, scalars, prefix='eval')
        if do_save:
          save(step, state, stop or last)
          guard.last_saved = step
          if hasattr(writer, 'flush'):
            writer.flush()   # the logs on disk reach the checkpoint: a resume after a kill continues them
        paused += time.perf_counter() - started
      if stop:
        writer.log(watch.stop_line(step))
        result.preempted, result.interrupted = True, watch.interrupted
        break
    if pending is not None:
      jax.block_until_ready(pending[1])
      guard.check_step(*pending)
      report(*pending)
  finally:
    watch.disarm()
    if own_watch:
      watch.close()
  result.state, result.last_step = state, step
  return result
