"""The training loop shared by `fmjax.train` and `fmjax.finetune`.

The host never waits on the device inside the loop: metrics of step n are read after step n+1
is dispatched (its `nonfinite` flag every step, the rest every `log_every` steps). Checkpoints
are saved asynchronously every `checkpoint_every` steps and at the end; SIGTERM (preemption)
finishes the current step, saves, waits for the save and returns. Before an evaluation or a save
the step is checked to be finite (fmjax/training/numerics.py), and the time spent evaluating and saving is
left out of the throughput window.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax.perf import flops as metrics_lib
from fmjax.training import numerics


@dataclass
class LoopResult:
  """What a finished (or preempted) loop leaves behind."""
  state: Any
  last_step: int
  preempted: bool = False
  history: list = field(default_factory=list)   # [(step, {metric: value})] as logged


class PreemptionWatch:
  """Notices SIGTERM; in multi-process runs all processes agree on the step to stop at.

  One process: a Python SIGTERM handler. Several: JAX's preemption sync manager (started by
  `jax.distributed.initialize`, see fmjax/runtime/distributed.py) catches SIGTERM in whichever process
  gets it and tells the others; every process stops at the same step, which all of them save.
  Must be asked at every step, with the same step numbers in every process.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # not the main thread
        self._previous = None

  def _handler(self, signum, frame):
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer in every process)."""
    stop = multihost_utils.reached_preemption_sync_point(step) if self._multi else self.requested
    if stop and self._multi:  # on every process (the writer logs on process 0 only)
      print(f'fmjax: process {jax.process_index()}: preemption: saving at step {step} and stopping',
            file=sys.stderr, flush=True)
    return stop

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def to_global(batch: dict, sharding) -> dict:
  """A process-local numpy batch -> global jax arrays sharded on the batch axis."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
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


def run_loop(*, train_step: Callable, state, batches: Iterator[dict], batch_sharding, start_step: int,
             total_steps: int, writer, model_cfg, seq_len: int, tokens_per_step: int, log_every: int,
             checkpoint_every: int = 0, save: Callable[[int, Any, bool], None] | None = None,
             evaluate: Callable[[Any, int], dict] | None = None, eval_every: int = 0,
             cpu_peak_flops: float = 0.0, compute_dtype: str = 'float32',
             guards: numerics.GuardConfig | None = None) -> LoopResult:
  """Run steps `start_step+1 .. total_steps`. `save(step, state, wait)` writes a checkpoint.

  Raises numerics.NonFiniteError at the first non-finite step (beyond `guards.skip_nonfinite_steps`)
  without saving it; checkpoints saved before stay valid.
  """
  platform = jax.devices()[0].platform
  # On CPU the (possibly forced) devices of a process share one processor: count hosts.
  flop_devices = jax.process_count() if platform == 'cpu' else jax.device_count()
  peak = metrics_lib.device_peak_flops(jax.devices()[0], cpu_peak_flops, compute_dtype)
  guards = guards or numerics.GuardConfig()
  guard = numerics.NumericsGuard(guards, jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec()),
                                 writer.log)
  monitor = numerics.DivergenceMonitor(guards.divergence_factor, guards.grad_spike_factor, guards.warmup_steps)
  watch = PreemptionWatch()
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
      do_eval = evaluate is not None and eval_every and (step % eval_every == 0 or last)
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
          writer.write(step, evaluate(state, step), prefix='eval')
        if do_save:
          save(step, state, stop or last)
          guard.last_saved = step
          if hasattr(writer, 'flush'):
            writer.flush()   # the logs on disk reach the checkpoint: a resume after a kill continues them
        paused += time.perf_counter() - started
      if stop:
        writer.log(f'preemption requested: checkpoint at step {step} written, exiting')
        result.preempted = True
        break
    if pending is not None:
      jax.block_until_ready(pending[1])
      guard.check_step(*pending)
      report(*pending)
  finally:
    watch.close()
  result.state, result.last_step = state, step
  return result
