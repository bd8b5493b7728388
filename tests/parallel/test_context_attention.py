"""Context-parallel attention (fmjax/parallel/context_attention.py) against full unsharded attention.

The reference is NumPy float64 over the global row, forward and its analytic backward, with the mask
built from row positions (not from the index arrays the kernels read). The kernels run under
`jax.shard_map` on (data, sequence) meshes (1, 8) and (2, 4), the sequence laid out contiguously or in
zigzag order: the global inputs are permuted, sharded, attended and the output un-permuted, all inside
one differentiated function of the global q, k, v.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fmjax.parallel import context_attention as ca

B, T, H, KVH, D = 2, 64, 4, 2, 8
# Packed rows: documents cross the shard boundaries of both meshes and both layouts; padding (0) at the end.
SEGMENTS = np.array([[1] * 13 + [2] * 30 + [3] * 15 + [0] * 6,
                     [1] * 40 + [2] * 17 + [0] * 7], np.int32)
KERNELS = {'ring': ca.ring_attention, 'gathered': ca.gathered_kv_attention}
TOL = 1e-5


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (r.normal(size=s).astype(np.float32) for s in ((B, T, H, D), (B, T, KVH, D), (B, T, KVH, D)))
  w = r.normal(size=(B, T, H, D)).astype(np.float32)   # the loss is sum(out * w): dL/dout = w
  return q, k, v, w


def reference(q, k, v, w, causal=True, window=0, softcap=0.0):
  """(out, dq, dk, dv) in float64: dense masked attention over the global row and its backward."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  g = H // KVH
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)   # (B, T, H, D): query head h reads kv head h // g
  scale = D ** -0.5
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  out, dq, dk, dv = (np.zeros_like(x) for x in (q, kr, kr, vr))
  for b in range(B):
    seg = SEGMENTS[b]
    mask = (seg[:, None] == seg[None, :]) & (seg[:, None] != 0)
    if causal:
      mask &= j <= i
    if window:
      mask &= i - j < window
    for h in range(H):
      raw = q[b, :, h] @ kr[b, :, h].T * scale
      t = np.tanh(raw / softcap) if softcap else None
      s = softcap * t if softcap else raw
      s = np.where(mask, s, -np.inf)
      mx = s.max(-1, keepdims=True)
      e = np.where(mask, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
      tot = e.sum(-1, keepdims=True)
      p = np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0)
      out[b, :, h] = p @ vr[b, :, h]
      do = w[b, :, h]
      dp = do @ vr[b, :, h].T
      ds = p * (dp - (dp * p).sum(-1, keepdims=True))
      if softcap:
        ds = ds * (1 - t ** 2)
      dq[b, :, h] = ds @ kr[b, :, h] * scale
      dk[b, :, h] = ds.T @ q[b, :, h] * scale
      dv[b, :, h] = p.T @ do
  fold = lambda x: x.reshape(B, T, KVH, g, D).sum(3)
  return out, dq, fold(dk), fold(dv)


@functools.lru_cache(maxsize=None)
def _mesh(data, sequence):
  return Mesh(np.array(jax.devices()[:data * sequence]).reshape(data, sequence), ('data', 'sequence'))


def sharded(kernel, mesh, layout, q_index=None, grad=True, **kw):
  """jit(value_and_grad) of sum(kernel(...) * w) as a function of the global q, k, v (has_aux: the output);
  with grad=False, jit of the output alone.

  `q_index` replaces the global indices the kernel is given (after the layout's permutation): for the
  tests that show a wrong index array is caught."""
  n = mesh.shape['sequence']
  order, inverse = ca.zigzag_order(T, n) if layout == 'zigzag' else (np.arange(T), np.arange(T))
  index = np.broadcast_to(np.arange(T, dtype=np.int32)[order], (B, T)) if q_index is None else q_index
  seg = SEGMENTS[:, order]
  spec = P('data', 'sequence')
  local = lambda q, k, v, i, s: KERNELS[kernel](q, k, v, i, i, s, s, axis_name='sequence', **kw)
  attend = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)

  def loss(q, k, v, w):
    out = attend(q[:, order], k[:, order], v[:, order], jnp.asarray(index), jnp.asarray(seg))[:, inverse]
    return jnp.sum(out * w), out

  if not grad:
    return jax.jit(lambda q, k, v, w: loss(q, k, v, w)[1])
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _errors(fn, q, k, v, w, ref):
  """Max abs errors of (out, dq, dk, dv), or of out alone for a forward-only `fn`."""
  result = fn(q, k, v, w)
  got = (result,) if isinstance(result, jax.Array) else (result[0][1],) + tuple(result[1])
  assert all(np.isfinite(np.asarray(x)).all() for x in got)
  return [float(np.abs(np.asarray(a, np.float64) - b).max()) for a, b in zip(got, ref)]


CASES = ([(kernel, mesh, layout, {}) for kernel in KERNELS for mesh in ((1, 8), (2, 4))
          for layout in ('contiguous', 'zigzag')]
         + [('ring', (1, 8), 'contiguous', dict(window=12)), ('ring', (1, 8), 'zigzag', dict(window=12)),
            ('gathered', (1, 8), 'zigzag', dict(window=12))]
         + [('ring', (2, 4), 'contiguous', dict(softcap=2.0)), ('ring', (2, 4), 'zigzag', dict(softcap=2.0)),
            ('gathered', (2, 4), 'contiguous', dict(softcap=2.0))])


@pytest.mark.parametrize('kernel,mesh,layout,kw', CASES,
                         ids=[f'{c[0]}-{c[1][0]}x{c[1][1]}-{c[2]}-{"-".join(c[3]) or "plain"}' for c in CASES])
def test_matches_full_attention_forward_and_gradients(kernel, mesh, layout, kw):
  q, k, v, w = _inputs()
  ref = reference(q, k, v, w, **kw)
  assert np.all(ref[0][SEGMENTS == 0] == 0)   # padding queries see no key: 0 output
  errors = _errors(sharded(kernel, _mesh(*mesh), layout, **kw), q, k, v, w, ref)
  assert max(errors) < TOL, dict(zip(('out', 'dq', 'dk', 'dv'), errors))


def test_window_crosses_shard_boundaries_and_changes_the_result():
  """Window 12 over 8-token shards reaches back into the previous shard (and 2 shards in zigzag)."""
  q, k, v, w = _inputs()
  assert np.abs(reference(q, k, v, w, window=12)[0] - reference(q, k, v, w)[0]).max() > 1e-2


def test_wrong_indices_or_mask_are_caught():
  """Local per-shard positions, zigzag without permuting the indices, or a non-causal call all differ
  from the causal reference, so the comparison above detects such bugs; non-causal matches its own."""
  q, k, v, w = _inputs()
  causal_ref = reference(q, k, v, w)
  mesh = _mesh(1, 8)
  local_positions = np.broadcast_to(np.tile(np.arange(T // 8, dtype=np.int32), 8), (B, T))
  unpermuted = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  for bug in (sharded('ring', mesh, 'contiguous', q_index=local_positions, grad=False),
              sharded('ring', mesh, 'zigzag', q_index=unpermuted, grad=False)):
    assert _errors(bug, q, k, v, w, causal_ref)[0] > 1e-2
  bidirectional = sharded('ring', mesh, 'zigzag', causal=False, grad=False)
  assert _errors(bidirectional, q, k, v, w, causal_ref)[0] > 1e-2
  assert _errors(bidirectional, q, k, v, w, reference(q, k, v, w, causal=False))[0] < TOL


def test_output_dtype_follows_q():
  q, k, v, w = _inputs()
  out = sharded('ring', _mesh(2, 4), 'zigzag', grad=False)(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), w)
  assert out.dtype == jnp.bfloat16 and out.shape == (B, T, H, D)
  assert np.abs(np.asarray(out, np.float32) - reference(q, k, v, w)[0]).max() < 5e-2


def test_zigzag_balances_causal_work_and_contiguous_does_not():
  work = ca.ring_work(1024, 8)
  steps = ca.ring_work(1024, 8, per_step=True)
  total = 1024 * 1025 // 2
  for layout in ('zigzag', 'contiguous'):
    assert work[layout].sum() == total and steps[layout].shape == (8, 8)
    assert (steps[layout].sum(1) == work[layout]).all()
  zz, cont = work['zigzag'], work['contiguous']
  assert zz.max() / zz.min() < 1.1
  assert (steps['zigzag'].max(0) / steps['zigzag'].min(0) < 1.1).all()   # every ring step, not just the sum
  assert cont.max() / cont.min() > 5


def test_zigzag_order_is_a_permutation_with_its_inverse():
  order, inverse = ca.zigzag_order(16, 2)
  assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
  assert (order[inverse] == np.arange(16)).all()


def test_zigzag_divisibility_error_names_both_numbers():
  with pytest.raises(ValueError) as e:
    ca.zigzag_order(60, 8)
  message = str(e.value)
  assert '\n' not in message and '60' in message and '16' in message
