"""Which parameters fine-tuning trains, and how fast: frozen / base / head groups, LoRA, the optimizer."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.training import optim
from fmjax.objectives.classification import HEAD
from fmjax.model import lora


def _names(path) -> list[str]:
  return [str(p.key) for p in path if hasattr(p, 'key')]


def param_group(names: Sequence[str], cfg) -> str:
  """'head' | 'base' | 'frozen' for a parameter path (a whole leaf; row freezing is separate)."""
  ft, top = cfg.finetune, names[0]
  if top == HEAD:
    return 'head'
  if ft.lora_rank > 0:
    return 'base' if names[-1] in lora.ADAPTER_KEYS else 'frozen'
  if ft.freeze_embeddings and top in ('embedding', 'pos_embedding'):
    return 'frozen'
  if top.startswith('layers_') and int(top[len('layers_'):]) < ft.freeze_layers:
    return 'frozen'
  if top == 'layers' and ft.freeze_layers >= cfg.model.num_layers:
    return 'frozen'
  return 'base'


def scale_by_group(cfg, head_scale: float = 1.0) -> optax.GradientTransformation:
  """Multiply each leaf by its group's factor: frozen 0, head `head_scale`, base 1; the first
  finetune.freeze_layers rows of scanned (stacked) block parameters 0."""
  rows = cfg.finetune.freeze_layers if cfg.model.scan_layers and not cfg.finetune.lora_rank else 0

  def scale(path, u):
    names = _names(path)
    group = param_group(names, cfg)
    if group == 'frozen':
      return jnp.zeros_like(u)
    if group == 'head' and head_scale != 1.0:
      return u * head_scale
    if rows and names[0] == 'layers':
      keep = (jnp.arange(u.shape[0]) >= rows).astype(u.dtype)
      return u * keep.reshape((-1,) + (1,) * (u.ndim - 1))
    return u

  def update(updates, state, params=None):
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


EMBEDDING_LEVEL = ('embedding', 'pos_embedding', 'type_embedding', 'embed_norm')  # below the first block


def layer_decay_factor(names: Sequence[str], cfg):
  """The learning-rate multiplier of a parameter under layer-wise decay d = finetune.layer_decay with L
  blocks: block i (0 = first) d^(L - i), embeddings d^(L + 1), the rest (head, final norm) 1. A stacked
  block parameter (scan_layers) gets a vector, one factor per block."""
  d, n, top = cfg.finetune.layer_decay, cfg.model.num_layers, names[0]
  if top == 'layers':
    return d ** (n - np.arange(n, dtype=np.float64))
  if top.startswith('layers_'):
    return d ** (n - int(top[len('layers_'):]))
  if top in EMBEDDING_LEVEL:
    return d ** (n + 1)
  return 1.0


def scale_by_layer_decay(cfg) -> optax.GradientTransformation:
  """Multiply each update by its `layer_decay_factor` (after AdamW: it scales the learning rate, weight
  decay included)."""
  def scale(path, u):
    factor = layer_decay_factor(_names(path), cfg)
    if np.ndim(factor):
      return u * jnp.asarray(factor, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    return u * jnp.asarray(factor, u.dtype)

  def update(updates, state, params=None):
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg):
  """fmjax's AdamW between two `scale_by_group`s: frozen gradients are zeroed before clipping,
  frozen updates (weight decay too) after; head updates scaled to finetune.head_learning_rate, and
  with finetune.layer_decay < 1 every update by its layer's factor. The schedule is cfg.optim's (its
  warmup_steps already resolved from finetune.warmup_ratio, see fmjax/finetune/schedule.py).
  Returns (tx, schedule). Frozen leaves keep (unused) Adam moments."""
  ratio = cfg.finetune.head_learning_rate / cfg.optim.learning_rate if cfg.finetune.head_learning_rate else 1.0
  parts = [scale_by_group(cfg), optim.make_optimizer(cfg.optim, cfg.steps), scale_by_group(cfg, ratio)]
  if cfg.finetune.layer_decay != 1.0:
    parts.append(scale_by_layer_decay(cfg))
  return optax.chain(*parts), optim.learning_rate_schedule(cfg.optim, cfg.steps)


def trainable_summary(params, cfg) -> str:
  counts = {'head': 0, 'base': 0, 'frozen': 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    counts[param_group(_names(path), cfg)] += int(leaf.size)
  rows = ''
  if cfg.finetune.freeze_layers and cfg.model.scan_layers and not cfg.finetune.lora_rank:
    rows = f' (first {cfg.finetune.freeze_layers} of the stacked blocks frozen by row)'
  return (f'{(counts["base"] + counts["head"]) / 1e6:.3f}M of {sum(counts.values()) / 1e6:.3f}M parameters train'
          f'{rows}; head {counts["head"]}')
