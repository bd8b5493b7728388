"""Learning-rate schedules (`optim.schedule`): linear warmup from 0 to the peak, then

  cosine        cosine decay to end_learning_rate at the schedule's end (optax's warmup_cosine_decay)
  linear        linear decay to end_learning_rate at the end
  constant      the peak to the end (a WSD run without its decay; a resume can start the decay)
  inverse_sqrt  peak * sqrt(warmup / step) (end_learning_rate unused)
  wsd           warmup, stable at the peak until the decay start, then decay to end_learning_rate at the end,
                shaped by optim.decay_shape: linear | cosine | sqrt (1 - sqrt(t), Hägele et al. 2024)

The schedule's end is optim.decay_steps, or `steps` when 0. WSD decays from optim.decay_start, or (0) from
the end minus optim.decay_fraction of it. Every schedule but cosine shares one warmup and one stable value,
so a constant run resumed as WSD with decay_start >= its checkpoint step repeats the same rates up to there
(fmjax/checkpoints/resume.py allows that change).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'linear', 'constant', 'inverse_sqrt', 'wsd')
DECAY_SHAPES = ('linear', 'cosine', 'sqrt')
USES_END = ('cosine', 'linear', 'wsd')   # schedules whose rates depend on where the schedule ends


def end_step(optim_cfg, total_steps: int) -> int:
  """The step the schedule ends at: optim.decay_steps, or total_steps when 0."""
  return int(optim_cfg.get('decay_steps', 0) or total_steps)


def decay_start(optim_cfg, total_steps: int) -> int:
  """The first step of the decay: for wsd optim.decay_start, else the end minus decay_fraction of it; the end
  of warmup for cosine and linear; the end for constant and inverse_sqrt (they never decay to an end)."""
  name, end = optim_cfg.get('schedule', 'cosine'), end_step(optim_cfg, total_steps)
  if name == 'wsd':
    return int(optim_cfg.get('decay_start', 0) or end - round(optim_cfg.get('decay_fraction', 0.2) * end))
  if name in ('cosine', 'linear'):
    return min(optim_cfg.warmup_steps, max(end - 1, 0)) if name == 'cosine' else optim_cfg.warmup_steps
  return end


def _shape(name: str, frac):
  """The share of (peak - end) left at `frac` in [0, 1] of the decay."""
  if name == 'linear':
    return 1.0 - frac
  if name == 'cosine':
    return 0.5 * (1.0 + jnp.cos(math.pi * frac))
  return 1.0 - jnp.sqrt(frac)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """The configured schedule as a function of the step (see the module docstring)."""
  name = optim_cfg.get('schedule', 'cosine')
  peak, end_lr, warmup = optim_cfg.learning_rate, optim_cfg.end_learning_rate, optim_cfg.warmup_steps
  end = end_step(optim_cfg, total_steps)
  if name == 'cosine':   # as fmjax has always made it (bit-identical rates)
    warmup = min(warmup, max(end - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=max(end, warmup + 1), end_value=end_lr)
  if name not in SCHEDULES:
    raise ValueError(f'unknown schedule {name!r}')
  start = decay_start(optim_cfg, total_steps)
  shape = 'linear' if name == 'linear' else optim_cfg.get('decay_shape', 'sqrt')
  length = max(end - start, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak * (t / max(warmup, 1))
    if name == 'inverse_sqrt':
      after = peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(t, 1.0))
    elif name == 'constant':
      after = jnp.full_like(t, peak)
    else:
      frac = jnp.clip((t - start) / length, 0.0, 1.0)
      after = jnp.where(t < start, peak, end_lr + (peak - end_lr) * _shape(shape, frac))
    return jnp.where(t < warmup, warm, after)
  return schedule


def summary(optim_cfg, total_steps: int) -> dict:
  """The schedule as used (derived steps resolved), for the log and the checkpoint metadata."""
  name = optim_cfg.get('schedule', 'cosine')
  out = {'schedule': name, 'learning_rate': optim_cfg.learning_rate, 'warmup_steps': optim_cfg.warmup_steps,
         'end_step': end_step(optim_cfg, total_steps)}
  if name in USES_END:
    out['end_learning_rate'] = optim_cfg.end_learning_rate
    out['decay_start'] = decay_start(optim_cfg, total_steps)
  if name == 'wsd':
    out['decay_shape'] = optim_cfg.get('decay_shape', 'sqrt')
  return out


def describe(optim_cfg, total_steps: int) -> str:
  """One line, e.g. 'schedule wsd: warmup 50 steps to 0.002, constant to step 480, sqrt decay to 0.0002 at
  step 600'."""
  s = summary(optim_cfg, total_steps)
  head = f'schedule {s["schedule"]}: warmup {s["warmup_steps"]} steps to {s["learning_rate"]:g}'
  if s['schedule'] == 'constant':
    return f'{head}, constant to step {s["end_step"]}'
  if s['schedule'] == 'inverse_sqrt':
    return f'{head}, then x sqrt(warmup / step) to step {s["end_step"]}'
  stable = f', constant to step {s["decay_start"]}' if s['schedule'] == 'wsd' else ''
  shape = s.get('decay_shape', s['schedule'])
  return f'{head}{stable}, {shape} decay to {s["end_learning_rate"]:g} at step {s["end_step"]}'
