"""The parts fmjax's optimizers are made of beyond optax's: which parameters are hidden matrices (and their
2-D view), a partition by label that keeps plain pruned dicts (no `MaskedNode`), optimizer state that keeps
its parameter's logical axes (so it is sharded like the parameter), and Adafactor's factored second moment
on the 2-D views.

A hidden matrix is an attention (q, k, v, o) or MLP (wi, wi_0, wi_1, wo) kernel of a block. Its 2-D view
(what Muon orthogonalises and Adafactor factors) has the kernel's input axes as rows and its output axes as
columns, e.g. q (embed, heads, head_dim) -> (embed, heads * head_dim), o (heads, head_dim, embed) -> (heads *
head_dim, embed); the leading layer axis of scanned blocks is a batch axis: each layer is its own matrix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
from optax.contrib import MuonDimensionNumbers

INPUT_PROJECTIONS = ('q', 'k', 'v', 'wi', 'wi_0', 'wi_1')   # input axis first: (embed, ...) -> (embed, rest)
OUTPUT_PROJECTIONS = ('o', 'wo')                            # output axis last: (..., embed) -> (rest, embed)
NOT_MATRICES = ('scale', 'bias')                            # norm scales and biases


def key_names(path) -> tuple[str, ...]:
  """('layers', 'attn', 'q', 'kernel') for a parameter's tree path (fmjax parameters are nested dicts)."""
  return tuple(str(getattr(p, 'key', getattr(p, 'name', getattr(p, 'idx', p)))) for p in path)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def leaf_shape(leaf) -> tuple[int, ...]:
  return tuple((leaf.value if _is_box(leaf) else leaf).shape)


def hidden_matrix_axes(names: tuple[str, ...], ndim: int) -> MuonDimensionNumbers | None:
  """(row axes, column axes) of a hidden matrix's 2-D view; None for every other parameter. Axes in
  neither (the scanned layer axis) are batch axes."""
  if len(names) < 3 or names[-1] != 'kernel' or not names[0].startswith('layers'):
    return None
  lead = 1 if names[0] == 'layers' else 0     # scanned blocks: axis 0 is the layer
  if ndim < lead + 2:
    return None
  if names[-2] in INPUT_PROJECTIONS:
    return MuonDimensionNumbers(reduction_axis=(lead,), output_axis=tuple(range(lead + 1, ndim)))
  if names[-2] in OUTPUT_PROJECTIONS:
    return MuonDimensionNumbers(reduction_axis=tuple(range(lead, ndim - 1)), output_axis=(ndim - 1,))
  return None


def matrix_axes(names: tuple[str, ...], ndim: int) -> MuonDimensionNumbers | None:
  """The 2-D view of any matrix parameter: a hidden matrix's, or (rows, columns) of another 2-D one
  (embeddings, the LM head, a classifier); None for norm scales, biases and vectors."""
  hidden = hidden_matrix_axes(names, ndim)
  if hidden is not None or names[-1] in NOT_MATRICES:
    return hidden
  lead = 1 if names[0] == 'layers' else 0
  return MuonDimensionNumbers((lead,), (lead + 1,)) if ndim - lead == 2 else None


# --- a partition by label into pruned dicts -------------------------------------------------------------

class PartitionState(NamedTuple):
  """The state of each label's transformation, over that label's parameters only."""
  inner: dict


def _labelled(tree, label_fn):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
  return [(key_names(p), label_fn(key_names(p), leaf), leaf) for p, leaf in leaves], treedef


def _pruned(labelled, label: str) -> dict:
  out: dict = {}
  for names, lab, leaf in labelled:
    if lab == label:
      node = out
      for n in names[:-1]:
        node = node.setdefault(n, {})
      node[names[-1]] = leaf
  return out


def _lookup(tree: dict, names: tuple[str, ...]):
  for n in names:
    tree = tree[n]
  return tree


def partition(transforms: dict[str, optax.GradientTransformation],
              label_fn: Callable[[tuple[str, ...], Any], str]) -> optax.GradientTransformation:
  """Apply transforms[label] to the parameters `label_fn(names, leaf)` labels so, each on a pruned nested
  dict of its own parameters (optax.partition's MaskedNode placeholders would break the state's sharding).
  A label with no parameters has no state."""
  def init(params):
    labelled, _ = _labelled(params, label_fn)
    present = {lab for _, lab, _ in labelled}
    return PartitionState({lab: tx.init(_pruned(labelled, lab)) for lab, tx in transforms.items() if lab in present})

  def update(updates, state, params=None):
    labelled, treedef = _labelled(updates, label_fn)
    p_labelled = _labelled(params, label_fn)[0] if params is not None else None
    new_updates, inner = {}, {}
    for lab, sub_state in state.inner.items():
      sub_params = _pruned(p_labelled, lab) if p_labelled is not None else None
      new_updates[lab], inner[lab] = transforms[lab].update(_pruned(labelled, lab), sub_state, sub_params)
    leaves = [_lookup(new_updates[lab], names) for names, lab, _ in labelled]
    return jax.tree_util.tree_unflatten(treedef, leaves), PartitionState(inner)
  return optax.GradientTransformation(init, update)


# --- optimizer state with its parameter's logical axes --------------------------------------------------

def _box_like(x, box):
  """`x` with the logical axes of parameter `box` where its dimensions match (size-1: a reduced axis, None);
  unboxed (replicated) when its rank differs or a dimension neither matches nor is 1."""
  shape = box.value.shape if _is_box(box) else ()
  if not _is_box(box) or x.ndim != len(shape) or any(d not in (s, 1) for d, s in zip(x.shape, shape)):
    return x
  names = tuple(n if d == s else None for n, d, s in zip(box.names, x.shape, shape))
  return dataclasses.replace(box, value=x, names=names)


def _rebox(node, treedef, boxes):
  if jax.tree_util.tree_structure(node) == treedef and treedef.num_leaves:
    return jax.tree_util.tree_unflatten(treedef, [_box_like(x, b) if _is_box(b) else x
                                                  for x, b in zip(jax.tree_util.tree_leaves(node), boxes)])
  if isinstance(node, tuple) and hasattr(node, '_fields'):
    return type(node)(*[_rebox(c, treedef, boxes) for c in node])
  if isinstance(node, (tuple, list)):
    return type(node)(_rebox(c, treedef, boxes) for c in node)
  if isinstance(node, dict):
    return {k: _rebox(v, treedef, boxes) for k, v in node.items()}
  return node


def keep_axes(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` whose init takes parameters boxed with logical axes (nn.Partitioned) and boxes every state tree
  shaped like them alike: a moment of the parameter's shape gets its axes, a factored one (size-1 axes)
  the axes it keeps; counts and other leaves stay unboxed (replicated)."""
  def init(params):
    boxes, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_box)
    raw = jax.tree_util.tree_unflatten(treedef, [b.value if _is_box(b) else b for b in boxes])
    return _rebox(tx.init(raw), jax.tree_util.tree_structure(raw), boxes)
  return optax.GradientTransformation(init, tx.update)


# --- Adafactor's factored second moment ---------------------------------------------------------------

class FactoredState(NamedTuple):
  """Second-moment estimates: per factored matrix its row and column means (the other view axes kept as
  size 1), per other parameter the full estimate `v` (placeholders of size 1 where unused)."""
  count: jax.Array
  v_row: Any
  v_col: Any
  v: Any


def factored_axes(names, shape, min_dim: int) -> MuonDimensionNumbers | None:
  """The 2-D view to factor, when both of its sides have at least `min_dim` entries."""
  axes = matrix_axes(names, len(shape))
  if axes is None:
    return None
  rows, cols = (math.prod(shape[a] for a in group) for group in (axes.reduction_axis, axes.output_axis))
  return axes if min(rows, cols) >= min_dim else None


def _keep(shape, dropped) -> tuple[int, ...]:
  return tuple(1 if i in dropped else s for i, s in enumerate(shape))


def scale_by_factored_rms(min_dim_to_factor: int = 128, decay_rate: float = 0.8,
                          epsilon: float = 1e-30) -> optax.GradientTransformation:
  """Adafactor's preconditioner (Shazeer & Stern 2018, optax.scale_by_factored_rms's maths) on each matrix's
  2-D view: for a rows x cols view it keeps rows + cols numbers (per layer for scanned blocks) instead of
  rows * cols. The decay of the estimate is 1 - t^-decay_rate at step t."""
  def axes_of(path, x):
    return factored_axes(key_names(path), x.shape, min_dim_to_factor)

  def init(params):
    def leaf(path, p):
      axes, ones = axes_of(path, p), jnp.zeros((1,) * p.ndim, p.dtype)
      if axes is None:
        return ones, ones, jnp.zeros_like(p)
      return (jnp.zeros(_keep(p.shape, axes.output_axis), p.dtype),
              jnp.zeros(_keep(p.shape, axes.reduction_axis), p.dtype), ones)
    per = jax.tree_util.tree_map_with_path(leaf, params)
    pick = lambda i: jax.tree.map(lambda t: t[i], per, is_leaf=lambda t: isinstance(t, tuple))
    return FactoredState(jnp.zeros([], jnp.int32), pick(0), pick(1), pick(2))

  def update(updates, state, params=None):
    del params
    beta = 1.0 - jnp.asarray(state.count + 1, jnp.float32) ** (-decay_rate)

    def leaf(path, g, v_row, v_col, v):
      axes, g2 = axes_of(path, g), g * g + epsilon
      if axes is None:
        v = beta * v + (1.0 - beta) * g2
        return g * jax.lax.rsqrt(v), v_row, v_col, v
      v_row = beta * v_row + (1.0 - beta) * jnp.mean(g2, axis=axes.output_axis, keepdims=True)
      v_col = beta * v_col + (1.0 - beta) * jnp.mean(g2, axis=axes.reduction_axis, keepdims=True)
      row_mean = jnp.mean(v_row, axis=axes.reduction_axis, keepdims=True)
      return g * jax.lax.rsqrt(v_row / row_mean) * jax.lax.rsqrt(v_col), v_row, v_col, v

    per = jax.tree_util.tree_map_with_path(leaf, updates, state.v_row, state.v_col, state.v)
    pick = lambda i: jax.tree.map(lambda t: t[i], per, is_leaf=lambda t: isinstance(t, tuple))
    return pick(0), FactoredState(optax.safe_increment(state.count), pick(1), pick(2), pick(3))
  return optax.GradientTransformation(init, update)
