"""LoRA: low-rank adapters on the attention and MLP projections, and merging them into the base.

A target projection y = x W becomes y = x W + (alpha / rank) (x A) B with A (in..., r) drawn
from N(0, 1/in) and B (r, out...) zero, so an adapted model starts exactly at the base model.
Adapters are switched on by a `lora` section in the model config (`with_lora`); the modules
that make each projection pass it its `LoraSpec` (fmjax/model/layers.py `lora_spec`), and the
adapter itself lives in `Projection`. This module holds the parameter-tree side: selecting,
stripping and merging adapters. The base parameter tree is unchanged when `lora` is absent.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections


ADAPTER_KEYS = ('lora_a', 'lora_b')


def with_lora(model_cfg, rank: int, alpha: float, targets) -> ml_collections.ConfigDict:
  """A copy of the model config whose projections named in `targets` get rank-`rank` adapters."""
  cfg = model_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.lora = ml_collections.ConfigDict(dict(rank=int(rank), alpha=float(alpha), targets=tuple(targets)))
  return cfg


def _is_adapter_holder(node) -> bool:
  return isinstance(node, dict) and 'lora_a' in node and 'kernel' in node


def is_adapter_path(path) -> bool:
  """True for a leaf path ending in lora_a / lora_b."""
  return bool(path) and str(getattr(path[-1], 'key', path[-1])) in ADAPTER_KEYS


def adapter_params(params) -> dict:
  """Only the adapter leaves (nested dicts), e.g. to save them apart from the base."""
  def walk(node):
    if not isinstance(node, dict):
      return None
    out = {}
    for k, v in node.items():
      if k in ADAPTER_KEYS:
        out[k] = v
      else:
        sub = walk(v)
        if sub:
          out[k] = sub
    return out
  return walk(params) or {}


def strip_adapters(params) -> dict:
  """The parameter tree without its adapter leaves."""
  if not isinstance(params, dict):
    return params
  return {k: strip_adapters(v) for k, v in params.items() if k not in ADAPTER_KEYS}


def merged_delta(kernel, a, b, scale: float):
  """scale * A B laid out like `kernel` (a leading 'layers' axis, if any, is batched over)."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  lead_shape, rank = a.shape[:lead], a.shape[-1]
  a2 = a.reshape(lead_shape + (-1, rank)).astype(jnp.float32)
  b2 = b.reshape(lead_shape + (rank, -1)).astype(jnp.float32)
  return (jnp.matmul(a2, b2) * scale).reshape(kernel.shape)


def merge(params, alpha: float, rank: int) -> dict:
  """Fold every adapter into its kernel: W + (alpha/rank) A B. Returns the plain base tree."""
  scale = alpha / rank

  def walk(node):
    if not isinstance(node, dict):
      return node
    if _is_adapter_holder(node):
      out = {k: v for k, v in node.items() if k not in ADAPTER_KEYS}
      k = node['kernel']
      out['kernel'] = (k.astype(jnp.float32) + merged_delta(k, node['lora_a'], node['lora_b'], scale)).astype(k.dtype)
      return out
    return {k: walk(v) for k, v in node.items()}
  return walk(params)
