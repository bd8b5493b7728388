"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, decay mask."""

from __future__ import annotations

import jax
import optax

NO_DECAY = ('scale', 'bias')  # norm scales and biases are exempt from weight decay


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `end_learning_rate`."""
  decay_steps = optim_cfg.decay_steps or total_steps
  warmup = min(optim_cfg.warmup_steps, max(decay_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(decay_steps, warmup + 1), end_value=optim_cfg.end_learning_rate)


def _key_name(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def weight_decay_mask(params):
  """True for leaves that decay: every parameter except norm scales and biases."""
  def decays(path, _):
    return not any(_key_name(p) in NO_DECAY for p in path)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """The Optax chain: clip (if set) -> AdamW(schedule, masked weight decay)."""
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)
