"""The training loop shared by `fmjax.train` and `fmjax.finetune`.

The host never waits on the device inside the loop: metrics of step n are read after step n+1
is dispatched, and only every `log_every` steps. Checkpoints are saved asynchronously every
`checkpoint_every` steps and at the end; SIGTERM (preemption) finishes the current step, saves,
waits for the save and returns.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from fmjax import metrics as metrics_lib


@dataclass
class LoopResult:
  """What a finished (or preempted) loop leaves behind."""
  state: Any
  last_step: int
  preempted: bool = False
  history: list = field(default_factory=list)   # [(step, {metric: value})] as logged


class PreemptionWatch:
  """Notices SIGTERM; in multi-process runs all processes agree on the step to stop at."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # not the main thread
        self._previous = None

  def _handler(self, signum, frame):
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

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


def run_loop(*, train_step: Callable, state, batches: Iterator[dict], batch_sharding, start_step: int,
             total_steps: int, writer, model_cfg, seq_len: int, tokens_per_step: int, log_every: int,
             checkpoint_every: int = 0, save: Callable[[int, Any, bool], None] | None = None,
             evaluate: Callable[[Any, int], dict] | None = None, eval_every: int = 0,
             cpu_peak_flops: float = 0.0, compute_dtype: str = 'float32') -> LoopResult:
  """Run steps `start_step+1 .. total_steps`. `save(step, state, wait)` writes a checkpoint."""
  platform = jax.devices()[0].platform
  # On CPU the (possibly forced) devices of a process share one processor: count hosts.
  flop_devices = jax.process_count() if platform == 'cpu' else jax.device_count()
  peak = metrics_lib.device_peak_flops(jax.devices()[0], cpu_peak_flops, compute_dtype)
  watch = PreemptionWatch()
  result = LoopResult(state=state, last_step=start_step)
  pending = None                       # (step, device metrics) of the step before the current one
  mark_time, mark_step = time.perf_counter(), start_step
  step = start_step

  def report(step_done: int, device_metrics) -> None:
    nonlocal mark_time, mark_step
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    steps = step_done - mark_step
    if steps > 0:
      host.update(metrics_lib.throughput(model_cfg, seq_len, steps * tokens_per_step, now - mark_time,
                                         flop_devices, peak))
      host['step_time'] = (now - mark_time) / steps
    mark_time, mark_step = now, step_done
    writer.write(step_done, host)
    result.history.append((step_done, host))

  try:
    while step < total_steps:
      batch = to_global(next(batches), batch_sharding)
      state, device_metrics = train_step(state, batch)
      step += 1
      if pending is not None:  # step n-1 is done when step n is queued: at most two in flight
        jax.block_until_ready(pending[1])
        if pending[0] % log_every == 0:
          report(*pending)
      pending = (step, device_metrics)
      writer.advance(step)
      last = step == total_steps
      if evaluate is not None and eval_every and (step % eval_every == 0 or last):
        writer.write(step, evaluate(state, step), prefix='eval')
      stop = watch.should_stop(step)
      if save is not None and (stop or last or (checkpoint_every and step % checkpoint_every == 0)):
        save(step, state, stop or last)
      if stop:
        writer.log(f'preemption requested: checkpoint at step {step} written, exiting')
        result.preempted = True
        break
    if pending is not None:
      report(*pending)
  finally:
    watch.close()
  result.state, result.last_step = state, step
  return result
