"""Pallas flash-attention kernels in fmjax's attention convention: splash on TPU, flash on GPU.

`splash_attention(q, k, v, q_seg, kv_seg)` (TPU) and `gpu_flash_attention` (GPU, JAX's Triton
flash kernel) take q (B, T, H, D), k/v (B, S, K, D) with H a multiple of K, int segment ids (0
marks padding), mask causally by index and across segments (exact for packed rows), and return
(B, T, H, D) in q's dtype, like `fmjax.model.attention.xla_attention`; softmax statistics are
fp32. Both kernels have their own VJP (Pallas backward kernels), so they train like the others.
Splash maps grouped and multi-query heads to their KV head itself; the GPU kernel wants as many
KV heads as query heads, so k and v are repeated per group there. Both read the layer's
`ScoreSpec` (`spec=`; `causal=False`, the encoders' shorthand, drops the causal mask and keeps the
segment mask): splash applies its sliding window (a local mask) and logit soft-cap too, the GPU
kernel neither (fmjax.model.attention_select.HONOURS). `interpret=True` runs either kernel in the
Pallas interpreter on any backend (slow; for tests). A Pallas call is not partitioned
automatically: the `sharded_*` functions run it per shard with `shard_map`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as _gpu_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _mask

from fmjax.model.attention_select import refuse_features
from fmjax.model.attention_spec import ScoreSpec, resolve

_LANES = _kernel.NUM_LANES  # 128: the kernel's key blocks must be whole multiples of this


def _block_sizes(bq: int, bkv: int) -> _kernel.BlockSizes:
  """The same query/key tiles for the forward, dq and dk/dv kernels."""
  return _kernel.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)


def _check_block(name: str, length: int, blk: int):
  if blk % _LANES or length % blk:
    raise ValueError(
        f"attention='splash' needs the {name} sequence length ({length}) to be a multiple of its "
        f'block ({blk}) and the block a multiple of {_LANES}; set seq_len to a multiple of {_LANES} '
        f'(fmjax then tiles by the largest of 512, 256, 128 dividing it) or use model.attention=auto')


def _head_mask(spec: ScoreSpec, t: int, s: int, offset: int = 0):
  """The splash mask of one head: full, causal, or causal within the sliding window (a local mask); query row
  i is the row's token i + offset (a chunk of a longer row, keys from its start)."""
  if spec.sliding_window is not None:
    return _mask.LocalMask((t, s), window_size=(spec.sliding_window - 1, 0), offset=offset)
  return _mask.CausalMask((t, s), offset=offset) if spec.causal else _mask.FullMask((t, s))


def splash_attention(q, k, v, q_seg, kv_seg, block: int = 512, interpret: bool = False, causal: bool | None = None,
                     spec: ScoreSpec | None = None, offset: int = 0):
  """Segment-masked attention under `spec` (default: causal unless `causal=False`) through the
  Pallas splash kernel (TPU); `offset`: the queries are the row's tokens offset.. offset + T - 1.

  The target platform is checked where the implementation is chosen (fmjax.model.attention.select),
  not here: a compile-only TPU program is traced on a CPU backend.
  """
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  spec = resolve(spec, d, causal)
  if h % kh:
    raise ValueError(f'query heads ({h}) must be a multiple of key/value heads ({kh})')
  bq, bkv = min(block, t), min(block, s)
  _check_block('query', t, bq)
  _check_block('key', s, bkv)

  mask = _mask.MultiHeadMask([_head_mask(spec, t, s, offset) for _ in range(h)])
  kernel = _kernel.make_splash_mha(mask, block_sizes=_block_sizes(bq, bkv), head_shards=1, q_seq_shards=1,
                                   attn_logits_soft_cap=spec.logit_softcap, interpret=interpret)
  qh = (q * jnp.asarray(spec.scale, q.dtype)).transpose(0, 2, 1, 3)  # (B, H, T, D), pre-scaled
  kh_, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # (B, K, S, D)
  seg = _kernel.SegmentIds(q=q_seg.astype(jnp.int32), kv=kv_seg.astype(jnp.int32))
  run = jax.vmap(lambda q_, k_, v_, seg_: kernel(q_, k_, v_, segment_ids=seg_))
  out = run(qh, kh_, vh, seg)                                          # (B, H, T, D)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def gpu_flash_attention(q, k, v, q_seg, kv_seg, interpret: bool = False, causal: bool | None = None,
                        spec: ScoreSpec | None = None):
  """Segment-masked self-attention under `spec` (default: causal unless `causal=False`) through JAX's
  Pallas (Triton) flash kernel (GPU), which applies no sliding window or soft-cap.

  One segment-id row serves queries and keys (self-attention: q_seg is kv_seg). The kernel
  tiles the sequence by min(128, T) (backward by min(32, T)), so T must be a multiple of those.
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  spec = resolve(spec, d, causal)
  refuse_features('pallas_gpu', spec)
  if h % kh:
    raise ValueError(f'query heads ({h}) must be a multiple of key/value heads ({kh})')
  if k.shape[1] != t or q_seg.shape != kv_seg.shape:
    raise ValueError("attention='pallas_gpu' is self-attention only (as many keys as queries)")
  blocks = _gpu_kernel.BlockSizes.get_default()
  blocks = _gpu_kernel.BlockSizes(**{f: min(getattr(blocks, f), t) for f in blocks.__dataclass_fields__})
  if any(t % getattr(blocks, f) for f in blocks.__dataclass_fields__):
    raise ValueError(f"attention='pallas_gpu' needs seq_len ({t}) to be a multiple of 128; "
                     'use model.attention=auto')
  if kh != h:  # the kernel reads key/value head i for query head i
    k, v = jnp.repeat(k, h // kh, axis=2), jnp.repeat(v, h // kh, axis=2)
  return _gpu_kernel.mha(q, k, v, q_seg.astype(jnp.int32), sm_scale=spec.scale, causal=spec.causal,
                         block_sizes=blocks, interpret=interpret)


def _spec_without_length(spec, name: str, impl: str, mesh=None):
  if spec[1] is not None and (mesh is None or _size(mesh, spec[1]) > 1):
    raise ValueError(f"attention='{impl}' needs the {name} sequence axis unsharded; it is sharded "
                     f'over {spec[1]!r} by logical_axis_rules (activation_length)')
  return spec


def _per_shard(run, impl: str, q, k, v, q_seg, kv_seg):
  """`run(q, k, v, q_seg, kv_seg)` on each device's shard of the batch and heads: `shard_map`
  over the mesh set by `jax.set_mesh`, with the specs the logical-axis rules give the
  activations. One device, or no mesh: a plain call."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, q_seg, kv_seg)
  axes = ('batch', 'activation_length', 'activation_heads', 'activation_kv')
  q_spec = _spec_without_length(nn.logical_to_mesh_axes(axes), 'query', impl, mesh)
  q_spec = P(q_spec[0], None, *q_spec[2:])
  batch = q_spec[0]
  if batch is not None and q.shape[0] % _size(mesh, batch):
    # A batch the batch axes cannot split (init traces 1 row; small decode or eval batches):
    # every device runs the whole batch of its heads, which is exact, only less parallel.
    q_spec = P(None, *q_spec[1:])
  heads = q_spec[2]
  head_shards = 1 if heads is None else _size(mesh, heads)
  kh = k.shape[2]
  if kh % head_shards == 0:
    kv_spec = q_spec
  elif kh == 1:  # MQA: every head shard keeps the single key/value head
    kv_spec = P(q_spec[0], None, None, q_spec[3])
  else:
    raise ValueError(f'attention={impl}: {kh} key/value heads cannot be split over {head_shards} '
                     'head shards; use a tensor axis that divides model.num_kv_heads')
  seg_spec = P(q_spec[0], None)
  return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_seg, kv_seg)


def sharded_splash_attention(q, k, v, q_seg, kv_seg, block: int = 512, interpret: bool = False,
                             causal: bool | None = None, spec: ScoreSpec | None = None):
  """`splash_attention` per shard of the batch and heads (see `_per_shard`)."""
  spec = resolve(spec, q.shape[-1], causal)
  run = lambda *a: splash_attention(*a, block=block, interpret=interpret, spec=spec)
  return _per_shard(run, 'splash', q, k, v, q_seg, kv_seg)


def sharded_gpu_flash_attention(q, k, v, q_seg, kv_seg, interpret: bool = False, causal: bool | None = None,
                                spec: ScoreSpec | None = None):
  """`gpu_flash_attention` per shard of the batch and heads (see `_per_shard`)."""
  spec = resolve(spec, q.shape[-1], causal)
  run = lambda *a: gpu_flash_attention(*a, interpret=interpret, spec=spec)
  return _per_shard(run, 'pallas_gpu', q, k, v, q_seg, kv_seg)


def _size(mesh, axes) -> int:
  names = axes if isinstance(axes, tuple) else (axes,)
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size
