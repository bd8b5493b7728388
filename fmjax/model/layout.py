"""Layer layouts of a parameter tree: scanned ('layers' with a leading axis) <-> unrolled ('layers_i')."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_scanned(params) -> bool:
  """True when the blocks' parameters are stacked under 'layers'."""
  return 'layers' in params


def scanned_to_unrolled(params, num_layers: int):
  """{'layers': stacked} -> {'layers_0': ..., 'layers_{n-1}': ...}; other entries unchanged."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return out


def unrolled_to_scanned(params, num_layers: int):
  """{'layers_i': ...} -> {'layers': stacked along a new leading axis}."""
  out = {k: v for k, v in params.items() if not k.startswith('layers_')}
  blocks = [params[f'layers_{i}'] for i in range(num_layers)]
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def to_layout(params, scanned: bool, num_layers: int):
  """Return params in the requested layout (a no-op when already there)."""
  if is_scanned(params) == scanned:
    return params
  return unrolled_to_scanned(params, num_layers) if scanned else scanned_to_unrolled(params, num_layers)
