"""Numerics guards of the training loop: stop on non-finite values, skip bad steps, warn on divergence.

The train step reports `nonfinite` (1.0 when its loss or gradient norm is not finite). The loop
reads that flag of step n-1 once step n is queued (the value is ready by then), so a run stops at
the first non-finite step with one line; with `skip_nonfinite_steps=N` the step itself leaves the
parameters and optimizer state unchanged on such steps, and the run stops at the (N+1)th. Before
any checkpoint or evaluation the loop also checks the state itself, so a non-finite state is
never saved. `DivergenceMonitor` warns once when the smoothed loss rises far above its minimum or
the gradient norm spikes far above its recent average.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmjax.errors import UserError

ADVICE = 'lower optim.learning_rate (or set optim.grad_clip), check the data, or set skip_nonfinite_steps=N'


class NonFiniteError(UserError):
  """The run produced a non-finite loss, gradient or state; it stopped without saving it."""


@dataclass(frozen=True)
class GuardConfig:
  """What the loop guards against (see the matching fields of fmjax/config.py)."""
  skip_nonfinite_steps: int = 0
  divergence_factor: float = 0.0
  grad_spike_factor: float = 0.0
  warmup_steps: int = 0

  @classmethod
  def from_config(cls, cfg) -> 'GuardConfig':
    return cls(skip_nonfinite_steps=cfg.skip_nonfinite_steps, divergence_factor=cfg.divergence_factor,
               grad_spike_factor=cfg.grad_spike_factor, warmup_steps=cfg.optim.warmup_steps)


def nonfinite_flag(*values: jax.Array) -> jax.Array:
  """1.0 if any of the scalars is nan or inf, else 0.0 (float32, for the metrics dict)."""
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in values]))
  return jnp.logical_not(finite).astype(jnp.float32)


GUARDED_EXTRAS = {'moe_router_logit_max': 'largest MoE router logit'}   # loss extras the guard checks too


def guarded_extras(extras: dict) -> list:
  """The values of a loss's extras that the guard checks (an MoE model's router logits)."""
  return [extras[k] for k in GUARDED_EXTRAS if k in extras]


def describe_step(host: dict) -> str:
  """'the loss is nan and the gradient norm is inf' from a step's host metrics."""
  named = (('loss', 'loss'), ('grad_norm', 'gradient norm')) + tuple(GUARDED_EXTRAS.items())
  found = [f'the {name} is {host[key]}' for key, name in named if key in host and not math.isfinite(host[key])]
  if not found and 'objective' in host and not math.isfinite(host['objective']):
    found = [f'the objective (loss + z-loss) is {host["objective"]}']
  return ' and '.join(found) or 'the step reported a non-finite value'


def _count_nonfinite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return sum((jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves), jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=8)
def _state_counter(replicated) -> Callable:
  """jit of state -> (non-finite parameter values, non-finite optimizer-state values), replicated."""
  return jax.jit(lambda s: (_count_nonfinite(s.params), _count_nonfinite(s.opt_state)),
                 out_shardings=(replicated, replicated))


class NumericsGuard:
  """Host side of the guard: reads each step's `nonfinite` flag once, counts skips, checks states."""

  def __init__(self, config: GuardConfig, replicated, log: Callable[[str], None]):
    self.limit = config.skip_nonfinite_steps
    self.log = log
    self.skipped: list[int] = []
    self.checked_through = -1
    self.last_saved: int | None = None
    self._count_state = _state_counter(replicated)

  def _saved_text(self) -> str:
    if self.last_saved is None:
      return 'no checkpoint was written by this run'
    return f'the last checkpoint written is step {self.last_saved}'

  def check_step(self, step: int, device_metrics: dict) -> None:
    """Raise NonFiniteError if step `step` was non-finite (beyond the skip allowance). Blocks on it."""
    if step <= self.checked_through or 'nonfinite' not in device_metrics:
      return
    self.checked_through = step
    if not float(jax.device_get(device_metrics['nonfinite'])):
      return
    what = describe_step({k: float(v) for k, v in jax.device_get(device_metrics).items()})
    if not self.limit:
      raise NonFiniteError(f'step {step}: {what}; the run stopped and saved nothing after it '
                           f'({self._saved_text()}); {ADVICE}')
    self.skipped.append(step)
    if len(self.skipped) > self.limit:
      steps = ', '.join(map(str, self.skipped[-5:]))
      raise NonFiniteError(f'step {step}: {what}; {len(self.skipped)} non-finite steps (last: {steps}) exceed '
                           f'skip_nonfinite_steps={self.limit}; the run stopped ({self._saved_text()}); '
                           'lower optim.learning_rate or check the data')
    self.log(f'step {step}: {what}; step skipped ({len(self.skipped)} of skip_nonfinite_steps={self.limit})')

  def check_state(self, step: int, state: Any) -> None:
    """Raise NonFiniteError if the parameters or optimizer state hold nan/inf (before a save or eval)."""
    params, opt = (int(x) for x in jax.device_get(self._count_state(state)))
    if params or opt:
      where = ' and '.join(f'{n} values of the {name}' for n, name in ((params, 'parameters'),
                                                                       (opt, 'optimizer state')) if n)
      raise NonFiniteError(f'step {step}: {where} became non-finite after the update (the loss and gradient '
                           f'norm were finite); the run stopped without saving ({self._saved_text()}); {ADVICE}')


class DivergenceMonitor:
  """Warns once when the loss diverges and once when the gradient norm spikes (after warmup).

  Loss: its exponential moving average (over logged steps, smoothing 0.9) exceeds
  `loss_factor` x the minimum of that average since warmup (the minimum floored at 0.1).
  Gradient norm: one logged value exceeds `grad_factor` x the moving average of the earlier ones.
  A factor of 0 turns that rule off.
  """

  SMOOTHING = 0.9
  LOSS_FLOOR = 0.1
  MIN_POINTS = 5

  def __init__(self, loss_factor: float, grad_factor: float, after_step: int = 0):
    self.loss_factor, self.grad_factor, self.after_step = loss_factor, grad_factor, after_step
    self.loss_ema = self.grad_ema = None
    self.min_loss, self.min_step, self.points = math.inf, 0, 0
    self.warned_loss = self.warned_grad = False

  def _ema(self, old, value):
    return value if old is None else self.SMOOTHING * old + (1 - self.SMOOTHING) * value

  def update(self, step: int, host: dict) -> list[str]:
    """Feed one logged step's metrics; returns the warnings to print (at most one of each kind, ever)."""
    loss, grad = host.get('loss'), host.get('grad_norm')
    if loss is None or not math.isfinite(loss):
      return []
    warnings = []
    self.loss_ema = self._ema(self.loss_ema, loss)
    past_warmup = step > self.after_step
    if past_warmup:
      self.points += 1
    if past_warmup and self.loss_ema < self.min_loss:
      self.min_loss, self.min_step = self.loss_ema, step
    ready = past_warmup and self.points >= self.MIN_POINTS
    if ready and self.loss_factor and not self.warned_loss:
      base = max(self.min_loss, self.LOSS_FLOOR)
      if self.loss_ema > self.loss_factor * base:
        self.warned_loss = True
        warnings.append(f'warning: step {step}: the loss (moving average {self.loss_ema:.4g}) is '
                        f'{self.loss_ema / base:.1f}x its minimum {self.min_loss:.4g} (step {self.min_step}); the run '
                        f'may be diverging: consider a lower optim.learning_rate (divergence_factor='
                        f'{self.loss_factor:g})')
    if grad is not None and math.isfinite(grad):
      if (ready and self.grad_factor and not self.warned_grad and self.grad_ema
          and grad > self.grad_factor * self.grad_ema):
        self.warned_grad = True
        warnings.append(f'warning: step {step}: gradient norm {grad:.4g} is {grad / self.grad_ema:.0f}x its moving '
                        f'average {self.grad_ema:.4g}; the run may be diverging: consider a lower '
                        f'optim.learning_rate or optim.grad_clip (grad_spike_factor={self.grad_factor:g})')
      self.grad_ema = self._ema(self.grad_ema, grad)
    return warnings
