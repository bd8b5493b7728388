"""Splash (flash) attention on TPU: JAX's bundled Pallas kernel in fmjax's attention convention.

`splash_attention(q, k, v, q_seg, kv_seg)` takes q (B, T, H, D), k/v (B, S, K, D) with H a
multiple of K, int segment ids (0 marks padding), masks causally by index and across segments,
and returns (B, T, H, D) in q's dtype, like `fmjax.model.attention.xla_attention`. The kernel
has its own VJP (Pallas backward kernels for dq and dk/dv), so it trains like the others.
Grouped and multi-query heads go straight to the kernel (it maps each query head to its KV
head), so k and v are never repeated. `interpret=True` runs the kernel in the Pallas
interpreter on any backend (slow; for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _mask

_LANES = _kernel.NUM_LANES  # 128: the kernel's key blocks must be whole multiples of this


def _block_sizes(bq: int, bkv: int) -> _kernel.BlockSizes:
  """The same query/key tiles for the forward, dq and dk/dv kernels."""
  return _kernel.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)


def _check_block(name: str, length: int, blk: int, block: int):
  if blk % _LANES or length % blk:
    raise ValueError(
        f"attention='splash' needs the {name} sequence length ({length}) to be a multiple of its "
        f'block min(model.attention_chunk={block}, {length}) = {blk}, and the block a multiple '
        f'of {_LANES}; set model.attention_chunk (e.g. 512) and the sequence length to match')


def splash_attention(q, k, v, q_seg, kv_seg, block: int = 512, interpret: bool = False):
  """Causal, segment-masked attention through the Pallas splash kernel (TPU)."""
  if not interpret and jax.default_backend() != 'tpu':
    raise ValueError("attention='splash' needs a TPU backend (Pallas TPU kernel); "
                     "use 'dense', 'chunked' or 'xla' here")
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if h % kh:
    raise ValueError(f'query heads ({h}) must be a multiple of key/value heads ({kh})')
  bq, bkv = min(block, t), min(block, s)
  _check_block('query', t, bq, block)
  _check_block('key', s, bkv, block)

  mask = _mask.MultiHeadMask([_mask.CausalMask((t, s)) for _ in range(h)])
  kernel = _kernel.make_splash_mha(mask, block_sizes=_block_sizes(bq, bkv), head_shards=1,
                                   q_seq_shards=1, interpret=interpret)
  qh = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)   # (B, H, T, D), pre-scaled
  kh_, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # (B, K, S, D)
  seg = _kernel.SegmentIds(q=q_seg.astype(jnp.int32), kv=kv_seg.astype(jnp.int32))
  run = jax.vmap(lambda q_, k_, v_, seg_: kernel(q_, k_, v_, segment_ids=seg_))
  out = run(qh, kh_, vh, seg)                                          # (B, H, T, D)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _spec_without_length(spec, name: str):
  if spec[1] is not None:
    raise ValueError(f"attention='splash' needs the {name} sequence axis unsharded; it is sharded "
                     f'over {spec[1]!r} by logical_axis_rules (activation_length)')
  return spec


def sharded_splash_attention(q, k, v, q_seg, kv_seg, block: int = 512, interpret: bool = False):
  """`splash_attention` on each device's shard of the batch and heads (a Pallas call is not
  partitioned automatically): `shard_map` over the mesh set by `jax.set_mesh`, with the specs
  the logical-axis rules give the activations. One device, or no mesh: a plain call."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.get_abstract_mesh()
  run = lambda *a: splash_attention(*a, block=block, interpret=interpret)
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, q_seg, kv_seg)
  axes = ('batch', 'activation_length', 'activation_heads', 'activation_kv')
  q_spec = _spec_without_length(nn.logical_to_mesh_axes(axes), 'query')
  heads = q_spec[2]
  head_shards = 1 if heads is None else _size(mesh, heads)
  kh = k.shape[2]
  if kh % head_shards == 0:
    kv_spec = q_spec
  elif kh == 1:  # MQA: every head shard keeps the single key/value head
    kv_spec = P(q_spec[0], None, None, q_spec[3])
  else:
    raise ValueError(f'attention=splash: {kh} key/value heads cannot be split over {head_shards} '
                     'head shards; use a tensor axis that divides model.num_kv_heads')
  seg_spec = P(q_spec[0], None)
  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_seg, kv_seg)


def _size(mesh, axes) -> int:
  names = axes if isinstance(axes, tuple) else (axes,)
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size
