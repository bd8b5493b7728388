"""Attention when the mesh shards the sequence (context parallelism, mesh.sequence > 1).

The logical axis 'activation_length' maps to the mesh axis 'sequence' (logical_axis_rules), so every
activation of a row is split along its tokens. Attention is the one layer that mixes tokens: here it
runs in `jax.shard_map` over the mesh with one of fmjax/parallel/context_attention.py's kernels
(model.context_attention): 'ring' passes the KV blocks around the context axis, 'all_gather' gathers
K and V on every shard (on TPU each shard then runs the splash kernel for its query chunks, with the
chunk's causal offset). Masks read the tokens' positions and segment ids, which follow the shard: a
query sees a key of its own document at a position <= its own (and within the sliding window), so
the result does not depend on how the row is laid out over the shards.

With model.context_load_balance (`balanced`) the Transformer lays each row out zigzag before the first
layer (tokens, positions and segment ids: shard s holds chunks s and 2n-1-s of the row, so under causal
masking every shard does the same work) and puts the final hidden states back in row order, so every
objective sees rows as they came.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fmjax.model.attention_spec import ScoreSpec
from fmjax.parallel import context_attention as kernels

AXIS = 'sequence'
STRATEGIES = ('ring', 'all_gather')
_ACTIVATION = ('batch', 'activation_length', 'activation_heads', 'activation_kv')


def context_size(mesh=None) -> int:
  """The size of the mesh's sequence axis (1 without a mesh or without the axis)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return 1
  return int(dict(mesh.shape).get(AXIS, 1))


def _size(mesh, axes) -> int:
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _specs(mesh, q, k):
  """(q spec, kv spec, position/segment spec) from the logical rules, for the shard_map."""
  q_spec = list(nn.logical_to_mesh_axes(_ACTIVATION))
  length = q_spec[1]
  names = (length,) if isinstance(length, str) else tuple(length or ())
  if AXIS not in names:
    raise ValueError(f"mesh.sequence={context_size(mesh)} needs logical_axis_rules to map 'activation_length' "
                     f"to 'sequence' (it maps to {length!r})")
  q_spec[1] = AXIS
  if q_spec[0] is not None and q.shape[0] % _size(mesh, q_spec[0]):
    q_spec[0] = None   # a batch the batch axes cannot split (init traces one row): exact, only less parallel
  heads = _size(mesh, q_spec[2])
  kv_spec = list(q_spec)
  if k.shape[2] % heads:
    if k.shape[2] != 1:
      raise ValueError(f'{k.shape[2]} key/value heads cannot be split over {heads} head shards; use a tensor axis '
                       'that divides model.num_kv_heads')
    kv_spec[2] = None   # MQA: every head shard keeps the single key/value head
  return P(*q_spec), P(*kv_spec), P(q_spec[0], AXIS)


def attend(q, k, v, positions, segment_ids, *, spec: ScoreSpec, strategy: str = 'ring', platform: str | None = None,
           load_balanced: bool = False, splash_block: int = 512, interpret: bool = False):
  """Self-attention of (B, T, H, D) q and (B, T, K, D) k, v whose T is sharded over the mesh's sequence axis.

  `positions` and `segment_ids` (B, T) are the tokens' in-document positions and document ids in the
  same layout (0 = padding). On TPU the 'all_gather' strategy runs splash per shard; `load_balanced`
  says the rows are in `to_zigzag`'s layout (splash then un-permutes the gathered keys)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"model.context_attention={strategy!r}: choose 'ring' or 'all_gather'")
  mesh = jax.sharding.get_abstract_mesh()
  n = context_size(mesh)
  q_spec, kv_spec, idx_spec = _specs(mesh, q, k)
  window = spec.sliding_window or 0
  options = dict(axis_name=AXIS, causal=spec.causal, window=window, scale=spec.scale,
                 softcap=spec.logit_softcap or 0.0)

  def run(q_, k_, v_, pos, seg):
    if strategy == 'ring':
      return kernels.ring_attention(q_, k_, v_, pos, pos, seg, seg, **options)
    if platform == 'tpu' or interpret:
      local = functools.partial(_gathered_splash, n=n, spec=spec, zigzag=load_balanced, block=splash_block,
                                interpret=interpret)
      return _rematerialised(local)(q_, k_, v_, seg)
    return kernels.gathered_kv_attention(q_, k_, v_, pos, pos, seg, seg, **options)

  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, idx_spec, idx_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, positions.astype(jnp.int32), segment_ids.astype(jnp.int32))


def chunks_of(shard: int, n: int, zigzag: bool) -> tuple[int, ...]:
  """The row chunks shard `shard` of `n` holds: (shard,) of n chunks, or zigzag (shard, 2n-1-shard) of 2n."""
  return (shard, 2 * n - 1 - shard) if zigzag else (shard,)


def _gathered_splash(q, k, v, seg, *, n, spec, zigzag, block, interpret):
  """Inside the shard_map: gather K, V and segment ids in row order, then splash for each local query chunk,
  its causal mask offset by the chunk's start (static per branch of a switch on the shard index)."""
  from fmjax.model import splash  # pylint: disable=import-outside-toplevel
  gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
  kg, vg, sg = gather(k), gather(v), gather(seg)
  t_local = q.shape[1]
  per = 2 if zigzag else 1
  c = t_local // per
  if zigzag:   # the gathered row is in zigzag order: put it back in row order
    inverse = kernels.zigzag_order(t_local * n, n)[1]
    kg, vg, sg = (jnp.take(a, jnp.asarray(inverse), axis=1) for a in (kg, vg, sg))

  def branch(shard, q_, kg_, vg_, seg_, sg_):
    outs = []
    for j, chunk in enumerate(chunks_of(shard, n, zigzag)):
      sl = slice(j * c, (j + 1) * c)
      outs.append(splash.splash_attention(q_[:, sl], kg_, vg_, seg_[:, sl], sg_, block=block, interpret=interpret,
                                          spec=spec, offset=chunk * c))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]

  if not spec.causal:   # a full mask has no offset: the same kernels on every shard
    return branch(0, q, kg, vg, seg, sg)
  shard = jax.lax.axis_index(AXIS)
  return jax.lax.switch(shard, [functools.partial(branch, s) for s in range(n)], q, kg, vg, seg, sg)


def _rematerialised(fn):
  """`fn` whose backward recomputes it from its inputs: a switch over the shards would otherwise keep every
  branch's residuals (n copies of the gathered K and V per layer) for the backward pass."""
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def balanced(cfg, decode: bool = False) -> bool:
  """Whether the model lays its rows out zigzag: a sharded sequence, model.context_load_balance, causal
  attention (bidirectional work is even anyway), not decoding."""
  from fmjax.model.attention_spec import is_causal  # pylint: disable=import-outside-toplevel
  return (not decode and context_size() > 1 and bool(cfg.get('context_load_balance', True)) and is_causal(cfg))


def to_zigzag(a, n: int):
  """(B, T, ...) in row order -> the zigzag layout over n shards (a permutation along T)."""
  return jnp.take(a, jnp.asarray(kernels.zigzag_order(a.shape[1], n)[0]), axis=1)


def from_zigzag(a, n: int):
  """The inverse of `to_zigzag`."""
  return jnp.take(a, jnp.asarray(kernels.zigzag_order(a.shape[1], n)[1]), axis=1)
