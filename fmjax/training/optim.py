"""The optimizer (`optim.name`) and its learning-rate schedule (`optim.schedule`, fmjax/training/schedules.py).

  adamw      AdamW (the default; as fmjax has always made it)
  muon       Muon on the hidden matrices (attention q/k/v/o and MLP kernels, each layer's 2-D view; Newton-
             Schulz-orthogonalised Nesterov momentum, scaled by optim.muon_rms * sqrt(max(rows, cols)) so one
             learning rate fits both, Liu et al. 2025), AdamW on embeddings, the LM head, norms and biases
  adafactor  Adafactor's factored second moment (rows + cols numbers per matrix view), update clipping at
             RMS 1, no momentum
  lion       Lion (sign of interpolated momentum; b1, b2 are its rates: the paper's 0.9, 0.99; it wants a
             3-10x lower learning rate and higher weight decay than AdamW)

Every one clips the global gradient norm first (optim.grad_clip), decays weights by learning rate x
optim.weight_decay except norm scales and biases (`weight_decay_mask`), and keeps each parameter's state
sharded like the parameter (fmjax/training/optimizers.py `keep_axes`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from fmjax.config.errors import ConfigError
from fmjax.training import optimizers
from fmjax.training import schedules
from fmjax.training.schedules import learning_rate_schedule  # noqa: F401  (re-exported)

OPTIMIZERS = ('adamw', 'muon', 'adafactor', 'lion')
NO_DECAY = optimizers.NOT_MATRICES  # norm scales and biases are exempt from weight decay


def weight_decay_mask(params):
  """True for leaves that decay: every parameter except norm scales and biases."""
  def decays(path, _):
    return not any(n in NO_DECAY for n in optimizers.key_names(path))
  return jax.tree_util.tree_map_with_path(decays, params)


def _adamw(cfg, schedule):
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=weight_decay_mask)


def _scale_by_matrix_shape(rms: float) -> optax.GradientTransformation:
  """Muon's update scale per hidden matrix view (rows x cols): rms * sqrt(max(rows, cols)) (an update of
  RMS `rms`, like AdamW's), or with rms 0 Jordan's sqrt(max(1, cols / rows))."""
  def scale(path, u):
    axes = optimizers.hidden_matrix_axes(optimizers.key_names(path), u.ndim)
    rows, cols = (math.prod(u.shape[a] for a in group) for group in (axes.reduction_axis, axes.output_axis))
    return u * (rms * math.sqrt(max(rows, cols)) if rms else math.sqrt(max(1.0, cols / rows)))

  def update(updates, state, params=None):
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _muon(cfg, schedule):
  dims = lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, x: optimizers.hidden_matrix_axes(optimizers.key_names(p), x.ndim), tree)
  hidden = optax.chain(
      contrib.scale_by_muon(ns_steps=cfg.muon_ns_steps, beta=cfg.muon_momentum, weight_dimension_numbers=dims),
      _scale_by_matrix_shape(cfg.muon_rms),
      optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(schedule))
  label = lambda names, leaf: ('muon' if optimizers.hidden_matrix_axes(names, len(optimizers.leaf_shape(leaf)))
                               else 'adamw')
  tx = optimizers.partition({'muon': optimizers.keep_axes(hidden),
                             'adamw': optimizers.keep_axes(_adamw(cfg, schedule))}, label)

  def init(params):
    state = tx.init(params)
    if 'muon' not in state.inner:
      raise ConfigError('optim.name=muon needs hidden matrices (attention or MLP kernels) to orthogonalise and '
                        'this model has none; use optim.name=adamw')
    return state
  return optax.GradientTransformation(init, tx.update)


def _adafactor(cfg, schedule):
  return optimizers.keep_axes(optax.chain(
      optimizers.scale_by_factored_rms(cfg.adafactor_min_dim, cfg.adafactor_decay),
      optax.clip_by_block_rms(1.0),
      optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(schedule)))


def _lion(cfg, schedule):
  return optimizers.keep_axes(optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                         mask=weight_decay_mask))


_BUILDERS = {'adamw': _adamw, 'muon': _muon, 'adafactor': _adafactor, 'lion': _lion}


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """The Optax chain: clip (if set) -> the optimizer optim.name with the schedule optim.schedule."""
  name = optim_cfg.get('name', 'adamw')
  if name not in _BUILDERS:
    raise ConfigError(f'optim.name={name!r} is not one of {", ".join(OPTIMIZERS)}')
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(_BUILDERS[name](optim_cfg, schedule))
  return optax.chain(*parts)


def state_bytes(opt_state) -> int:
  """Bytes of an optimizer state (arrays or ShapeDtypeStructs, boxed or not)."""
  leaves = jax.tree_util.tree_leaves(opt_state)
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves if hasattr(x, 'dtype'))


def hidden_matrices(params) -> tuple[int, int]:
  """(count, scalars) of the hidden matrices in a parameter tree (Muon's share)."""
  sizes = [math.prod(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
           if optimizers.hidden_matrix_axes(optimizers.key_names(p), len(x.shape))]
  return len(sizes), sum(sizes)


def summary(optim_cfg, total_steps: int) -> dict:
  """The optimizer and the schedule as used (derived steps resolved): checkpoint metadata and the log."""
  return {'name': optim_cfg.get('name', 'adamw'), **schedules.summary(optim_cfg, total_steps)}


def describe(optim_cfg, total_steps: int, params=None, opt_state=None) -> list[str]:
  """Log lines naming the optimizer (its share of the parameters, its state's size) and the schedule."""
  name = optim_cfg.get('name', 'adamw')
  line = f'optimizer {name}'
  if params is not None:
    n = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    if name == 'muon':
      count, size = hidden_matrices(params)
      line += f': Muon on {count} hidden matrices ({size / max(n, 1):.0%} of the parameters), AdamW on the rest'
    if opt_state is not None:
      line += f'; state {state_bytes(opt_state) / max(n, 1):.2f} bytes per parameter'
  return [line, schedules.describe(optim_cfg, total_steps)]
