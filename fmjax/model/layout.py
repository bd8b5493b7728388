"""Layer layouts of a parameter tree: scanned ('layers' with a leading axis) <-> unrolled ('layers_i').

The one converter of fmjax (checkpoint conversion, tests and tools use it). It works one leaf at
a time and drops each source leaf from its working copy as soon as it is used, so converting a
large model needs about one layer's worth of extra memory when the caller lets go of the input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_scanned(params) -> bool:
  """True when the blocks' parameters are stacked under 'layers'."""
  return 'layers' in params


def to_layout(params: dict, scanned: bool, num_layers: int) -> dict:
  """params in the requested layout: a new top-level dict (the input dict is not changed)."""
  if is_scanned(params) == scanned:
    return params
  params = dict(params)
  if scanned:
    columns, treedef = [], None
    for i in range(num_layers):
      leaves, treedef = jax.tree_util.tree_flatten(params.pop(f'layers_{i}'))
      columns.append(leaves)
    stacked = []
    for j in range(len(columns[0])):
      stacked.append(jnp.stack([col[j] for col in columns]))
      for col in columns:
        col[j] = None
    params['layers'] = jax.tree_util.tree_unflatten(treedef, stacked)
  else:
    leaves, treedef = jax.tree_util.tree_flatten(params.pop('layers'))
    per_layer = [[None] * len(leaves) for _ in range(num_layers)]
    for j in range(len(leaves)):
      for i in range(num_layers):
        per_layer[i][j] = leaves[j][i]
      leaves[j] = None
    for i in range(num_layers):
      params[f'layers_{i}'] = jax.tree_util.tree_unflatten(treedef, per_layer[i])
  return params


def scanned_to_unrolled(params, num_layers: int):
  """{'layers': stacked} -> {'layers_0': ..., 'layers_{n-1}': ...}; other entries unchanged."""
  return to_layout(params, False, num_layers)


def unrolled_to_scanned(params, num_layers: int):
  """{'layers_i': ...} -> {'layers': stacked along a new leading axis}."""
  return to_layout(params, True, num_layers)
