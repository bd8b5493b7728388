"""Context-parallel attention: the sequence dimension sharded over a mesh axis (e.g. 'sequence').

Both kernels run INSIDE `jax.shard_map` over `axis_name`. Each device holds one block of the row:
q (B, Tq, H, D), k/v (B, Tk, KVH, D) (GQA: H a multiple of KVH), the tokens' global indices within
the row (B, T) int32 and their packed-document segment ids (B, T) int32 (0 = padding). Query i sees
key j when both carry the same nonzero segment id, j <= i when `causal`, and i - j < window when
`window` > 0; its score is `scale * q.k` (scale defaults to head_dim**-0.5), then
`softcap * tanh(score / softcap)` when `softcap` > 0, before an fp32 softmax. A query that sees no
key gets 0 (no NaN, forward or backward). Masks read the index arrays, never local positions, so any
layout of the sequence over the devices works (contiguous, or zigzag for causal balance).

`ring_attention`: the KV block (with its index and segment arrays) travels around the ring of the
n devices with `ppermute` (device s sends to s + 1, so at step r it holds the block of device s - r).
Every step folds one block into an online softmax (running max m, sum l and output accumulator, fp32),
so no device ever holds more than two KV blocks. The backward pass (custom VJP) is a second ring: the
residuals are the local q, k, v, output and logsumexp; dq accumulates in place while each block's
dk/dv accumulators travel with it, and one last hop brings them home. Fully masked blocks are
computed, not skipped: with the zigzag layout every device does the same unmasked work anyway.

`gathered_kv_attention`: the simple alternative: all-gather k, v and their index/segment arrays over
`axis_name`, then plain masked attention (autodiff; the gather transposes to a reduce-scatter).

`zigzag_order(seq_len, shards)`: the causal load-balancing layout. The row is cut into 2 * shards
chunks and shard s holds chunks s and 2 * shards - 1 - s, so every device pairs an early chunk with a
late one. `ring_work` counts the visible (query, key) pairs each device computes per ring step, for
the zigzag and the contiguous layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def _check(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f'expected q (B, Tq, H, D) and k, v (B, Tk, KVH, D); got q {q.shape}, k {k.shape}, '
                     f'v {v.shape}')
  if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3] or q.shape[0] != k.shape[0]:
    raise ValueError(f'q {q.shape} and k {k.shape} do not fit: query heads must be a multiple of kv heads, '
                     'with the same batch and head_dim')


def _mask(q_index, kv_index, q_seg, kv_seg, causal, window):
  """(B, 1, 1, Tq, Tk) bool: which keys each query sees (see the module docstring)."""
  qi, kj = q_index[:, :, None], kv_index[:, None, :]
  qs = q_seg[:, :, None]
  mask = (qs == kv_seg[:, None, :]) & (qs != 0)
  if causal:
    mask &= kj <= qi
  if window > 0:
    mask &= qi - kj < window
  return mask[:, None, None]


def _group(x, kv_heads):
  """(B, T, H, D) -> (B, KVH, G, T, D)."""
  b, t, h, d = x.shape
  return x.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _ungroup(x):
  """(B, KVH, G, T, D) -> (B, T, H, D)."""
  b, kh, g, t, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, d)


def _mm(eq, a, b):
  """einsum with fp32 accumulation; an fp32 operand is cast to the other's (input) dtype."""
  dtype = b.dtype if a.dtype == _F32 else a.dtype
  return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), preferred_element_type=_F32)


def _scores(qg, k, scale, softcap):
  """qg (B, KVH, G, Tq, D), k (B, Tk, KVH, D) -> fp32 scores (B, KVH, G, Tq, Tk) and tanh (or None)."""
  s = _mm('bkgtd,bskd->bkgts', qg, k) * scale
  if softcap > 0:
    t = jnp.tanh(s / softcap)
    return t * softcap, t
  return s, None


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _ring_forward(q, k, v, q_index, kv_index, q_seg, kv_seg, axis_name, causal, window, scale, softcap):
  """(output (B, Tq, H, D) in q's dtype, logsumexp (B, KVH, G, Tq) fp32; 0 where a query sees no key)."""
  n = jax.lax.axis_size(axis_name)
  qg = _group(q, k.shape[2])

  def fold(carry, kv):
    m, l, acc = carry
    k_, v_, ki, ks = kv
    s, _ = _scores(qg, k_, scale, softcap)
    mask = _mask(q_index, ki, q_seg, ks, causal, window)
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)   # no key yet: keep everything at 0, not NaN
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + p.sum(-1)
    acc = alpha[..., None] * acc + _mm('bkgts,bskd->bkgtd', p, v_)
    return m_new, l, acc

  b, kh, g, tq, d = qg.shape
  init = (jnp.full((b, kh, g, tq), -jnp.inf, _F32), jnp.zeros((b, kh, g, tq), _F32),
          jnp.zeros((b, kh, g, tq, d), _F32))
  kv = (k, v, kv_index, kv_seg)
  carry = fold(init, kv)

  def step(state, _):
    carry, kv = state
    kv = jax.lax.ppermute(kv, axis_name, _ring_perm(n))
    return (fold(carry, kv), kv), None

  (carry, _), _ = jax.lax.scan(step, (carry, kv), None, length=n - 1)
  m, l, acc = carry
  seen = l > 0
  out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
  return _ungroup(out).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _ring(q, k, v, q_index, kv_index, q_seg, kv_seg, axis_name, causal, window, scale, softcap):
  return _ring_forward(q, k, v, q_index, kv_index, q_seg, kv_seg, axis_name, causal, window, scale, softcap)[0]


def _ring_fwd(q, k, v, q_index, kv_index, q_seg, kv_seg, axis_name, causal, window, scale, softcap):
  out, lse = _ring_forward(q, k, v, q_index, kv_index, q_seg, kv_seg, axis_name, causal, window, scale, softcap)
  return out, (q, k, v, q_index, kv_index, q_seg, kv_seg, out, lse)


def _ring_bwd(axis_name, causal, window, scale, softcap, res, g):
  """The second ring: dS = P * (dP - rowsum(dO * O)) per block; dk/dv travel with their block."""
  q, k, v, q_index, kv_index, q_seg, kv_seg, out, lse = res
  n = jax.lax.axis_size(axis_name)
  kh = k.shape[2]
  qg, dog = _group(q, kh), _group(g, kh)
  delta = jnp.sum(dog.astype(_F32) * _group(out, kh).astype(_F32), axis=-1)

  def fold(dq, kv, dkv):
    k_, v_, ki, ks = kv
    dk, dv = dkv
    s, t = _scores(qg, k_, scale, softcap)
    mask = _mask(q_index, ki, q_seg, ks, causal, window)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    dv = dv + _mm('bkgts,bkgtd->bskd', p, dog)
    ds = p * (_mm('bkgtd,bskd->bkgts', dog, v_) - delta[..., None])
    if t is not None:
      ds = ds * (1.0 - jnp.square(t))
    ds = ds * scale
    dq = dq + _mm('bkgts,bskd->bkgtd', ds, k_)
    dk = dk + _mm('bkgts,bkgtd->bskd', ds, qg)
    return dq, (dk, dv)

  kv = (k, v, kv_index, kv_seg)
  dq, dkv = fold(jnp.zeros(qg.shape, _F32), kv, (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)))

  def step(state, _):
    dq, kv, dkv = state
    kv, dkv = jax.lax.ppermute((kv, dkv), axis_name, _ring_perm(n))
    dq, dkv = fold(dq, kv, dkv)
    return (dq, kv, dkv), None

  (dq, _, dkv), _ = jax.lax.scan(step, (dq, kv, dkv), None, length=n - 1)
  dk, dv = jax.lax.ppermute(dkv, axis_name, _ring_perm(n)) if n > 1 else dkv   # the last hop: home
  return (_ungroup(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, q_index, kv_index, q_segments, kv_segments, *, axis_name, causal=True, window=0,
                   scale=None, softcap=0.0):
  """Attention of the local query block over the whole sequence, KV blocks passed around the ring.

  Call inside `jax.shard_map` over `axis_name` (see the module docstring); returns (B, Tq, H, D) in q's dtype.
  """
  _check(q, k, v)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  return _ring(q, k, v, q_index.astype(jnp.int32), kv_index.astype(jnp.int32), q_segments.astype(jnp.int32),
               kv_segments.astype(jnp.int32), axis_name, bool(causal), int(window), scale, float(softcap))


def masked_attention(q, k, v, q_index, kv_index, q_segments, kv_segments, *, causal=True, window=0, scale=None,
                     softcap=0.0):
  """Plain (single-device) masked attention with the same semantics; 0 for a query that sees no key."""
  _check(q, k, v)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  qg = _group(q, k.shape[2])
  s, _ = _scores(qg, k, scale, softcap)
  mask = _mask(q_index, kv_index, q_segments, kv_segments, causal, window)
  p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
  p = jnp.where(mask, p, 0.0)   # a row with no visible key would be uniform: zero it (gradient 0 too)
  return _ungroup(_mm('bkgts,bskd->bkgtd', p, v)).astype(q.dtype)


def gathered_kv_attention(q, k, v, q_index, kv_index, q_segments, kv_segments, *, axis_name, causal=True,
                          window=0, scale=None, softcap=0.0):
  """All-gather k, v and their indices/segments over `axis_name`, then local masked attention.

  Call inside `jax.shard_map` over `axis_name`; returns (B, Tq, H, D) in q's dtype.
  """
  gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
  return masked_attention(q, gather(k), gather(v), q_index, gather(kv_index), q_segments, gather(kv_segments),
                          causal=causal, window=window, scale=scale, softcap=softcap)


def zigzag_order(seq_len: int, shards: int):
  """(order, inverse) int arrays: x[..., order] laid out contiguously puts chunks s and 2*shards-1-s of
  the row (seq_len / (2 * shards) tokens each) on shard s; y[..., inverse] undoes it."""
  if shards < 1 or seq_len % (2 * shards):
    raise ValueError(f'zigzag layout: seq_len {seq_len} is not divisible by 2 * shards = {2 * shards} '
                     f'(shards={shards})')
  chunks = np.arange(seq_len).reshape(2 * shards, -1)
  order = np.concatenate([np.concatenate([chunks[s], chunks[2 * shards - 1 - s]]) for s in range(shards)])
  return order, np.argsort(order)


def ring_work(seq_len: int, shards: int, window: int = 0, per_step: bool = False):
  """Visible causal (query, key) pairs each device computes in ring attention over one document row.

  Returns {'zigzag': ..., 'contiguous': ...}: arrays (shards,) summed over the ring steps, or
  (shards, steps) with `per_step` (at step r device s holds the KV block of device s - r).
  """
  layouts = {'zigzag': zigzag_order(seq_len, shards)[0], 'contiguous': np.arange(seq_len)}
  out = {}
  for name, order in layouts.items():
    blocks = order.reshape(shards, -1)
    work = np.zeros((shards, shards), np.int64)
    for s in range(shards):
      qi = blocks[s][:, None]
      for r in range(shards):
        kj = blocks[(s - r) % shards][None, :]
        visible = kj <= qi
        if window > 0:
          visible &= qi - kj < window
        work[s, r] = visible.sum()
    out[name] = work if per_step else work.sum(1)
  return out
