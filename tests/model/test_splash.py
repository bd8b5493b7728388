"""Pallas kernels (splash on TPU, flash on GPU) against the XLA reference, via Pallas interpret mode on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.model.attention import xla_attention
from fmjax.model.splash import splash_attention


def _segments(b, t):
  """Row 0: two packed documents and a padded tail (segment 0); other rows: one document."""
  seg = np.ones((b, t), np.int32)
  seg[0, : t * 3 // 8] = 1
  seg[0, t * 3 // 8: t * 3 // 4] = 2
  seg[0, t * 3 // 4:] = 0
  return jnp.asarray(seg)


def _inputs(b, t, h, kh, d, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, h, d), dtype)
  k = jax.random.normal(kk, (b, t, kh, d), dtype)
  v = jax.random.normal(kv, (b, t, kh, d), dtype)
  return q, k, v, _segments(b, t)


def _splash(block):
  return lambda q, k, v, qs, ks: splash_attention(q, k, v, qs, ks, block=block, interpret=True)


@pytest.mark.parametrize('h,kh,d,block', [
    (2, 2, 128, 128),   # MHA, two query/key blocks
    (4, 2, 128, 512),   # GQA, block clipped to the sequence length
    (2, 1, 64, 128),    # MQA, smaller head_dim
])
def test_splash_matches_xla_forward_and_grad(h, kh, d, block):
  b, t = 2, 256
  q, k, v, seg = _inputs(b, t, h, kh, d)
  w = jax.random.normal(jax.random.key(1), (b, t, h, d))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg) * w)

  splash = jax.jit(_splash(block))
  out = splash(q, k, v, seg, seg)
  ref = xla_attention(q, k, v, seg, seg)
  assert out.shape == ref.shape and out.dtype == q.dtype
  # padded rows (segment 0) attend causally to the padding, in both: compare every row
  np.testing.assert_allclose(out, ref, atol=2e-4, rtol=2e-4)

  grads = jax.jit(jax.grad(loss(_splash(block)), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
  for name, g, rg in zip('qkv', grads, ref_grads):
    assert g.shape == rg.shape, name
    np.testing.assert_allclose(g, rg, atol=1e-3, rtol=1e-3, err_msg=f'd{name}')


def test_splash_bfloat16_forward():
  q, k, v, seg = _inputs(2, 256, 2, 2, 128, jnp.bfloat16)
  out = _splash(128)(q, k, v, seg, seg)
  assert out.dtype == jnp.bfloat16
  ref = xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg, seg)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(jax.default_backend() == 'tpu', reason='the error is for non-TPU backends')
def test_splash_model_off_tpu_is_a_one_line_error():
  """The platform is checked where the implementation is chosen (a compile-only TPU program is
  traced on the CPU backend, so the kernel itself cannot check it)."""
  from fmjax.model import Transformer
  from fmjax.model.attention import AttentionError
  from helpers import tiny_config
  cfg = tiny_config(attention='splash', max_seq_len=128).model
  with pytest.raises(AttentionError, match='needs a TPU and the backend is cpu') as err:
    Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 128), jnp.int32))
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('t,block', [(200, 128), (64, 512)])
def test_splash_rejects_sequence_not_a_block_multiple(t, block):
  """The message names what applies (seq_len, the tile), not model.attention_chunk, which splash ignores."""
  q, k, v, seg = _inputs(1, t, 2, 2, 128)
  with pytest.raises(ValueError, match='set seq_len to a multiple of 128') as err:
    splash_attention(q, k, v, seg, seg, block=block, interpret=True)
  assert 'attention_chunk' not in str(err.value) and f'({t})' in str(err.value)


def test_sharded_splash_on_a_2x2x2_mesh_matches_reference():
  """Under a (data, fsdp, tensor) mesh the kernel runs per shard (shard_map) with the same result."""
  import flax.linen as nn
  from fmjax import config as config_lib
  from fmjax.parallel import sharding as shd
  from fmjax.model.splash import sharded_splash_attention
  q, k, v, seg = _inputs(4, 128, 4, 2, 64)
  cfg = config_lib.base_config()
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with shd.activate(mesh, shd.axis_rules(cfg)):
    f = jax.jit(lambda q, k, v, s: sharded_splash_attention(q, k, v, s, s, block=128, interpret=True))
    got = f(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k, v, seg, seg)), atol=2e-4)


def test_sharded_gpu_flash_on_a_2x2x2_mesh_matches_reference():
  """The Pallas GPU kernel (packed rows on GPU) runs per shard too, GQA heads split over `tensor`."""
  from fmjax import config as config_lib
  from fmjax.parallel import sharding as shd
  from fmjax.model.splash import sharded_gpu_flash_attention
  q, k, v, seg = _inputs(4, 64, 4, 2, 16)
  cfg = config_lib.base_config()
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with shd.activate(mesh, shd.axis_rules(cfg)):
    got = jax.jit(lambda q, k, v, s: sharded_gpu_flash_attention(q, k, v, s, s, interpret=True))(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(xla_attention(q, k, v, seg, seg)), atol=2e-5)
