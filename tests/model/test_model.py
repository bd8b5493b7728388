"""Model: attention implementations, segment masking, layer layouts, RoPE against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.model import Transformer
from fmjax.model import attention as attn
from fmjax.model import layout
from fmjax.model.layers import apply_rope
from helpers import tiny_config


def _qkv(b=2, t=24, h=4, kh=2, d=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k1, (b, t, h, d)), jax.random.normal(k2, (b, t, kh, d)),
          jax.random.normal(k3, (b, t, kh, d)))


def numpy_attention(q, k, v, seg):
  """Independent reference: loops over heads, explicit causal + segment mask."""
  q, k, v, seg = map(np.asarray, (q, k, v, seg))
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d)
      mask = np.tril(np.ones((t, t), bool)) & (seg[bi][:, None] == seg[bi][None, :])
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, hi // g]
  return out


# The CPU-runnable implementations. `auto` resolves to one of these per platform (tested in
# test_auto_attention_picks_per_backend); the GPU/TPU kernels (cudnn, pallas_gpu, splash) are
# checked through their own calls in test_attention_gpu.py and test_splash.py.
@pytest.mark.parametrize('impl', ['xla', 'dense', 'chunked'])
def test_attention_implementations_match_numpy(impl):
  q, k, v = _qkv()
  seg = np.ones((2, 24), np.int32)
  seg[0, 10:] = 2
  seg[1, 20:] = 0  # padding tail
  out = attn.attend(impl, q, k, v, jnp.asarray(seg), jnp.asarray(seg), chunk=8)
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, seg), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('impl', ['dense', 'chunked'])
@pytest.mark.parametrize('kh', [4, 2, 1])  # MHA, GQA, MQA
def test_attention_gradients_match_autodiff_reference(impl, kh):
  q, k, v = _qkv(t=20, kh=kh)
  seg = np.ones((2, 20), np.int32)
  seg[0, 7:] = 2
  seg[1, 16:] = 0
  seg = jnp.asarray(seg)
  w = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  loss = lambda f: (lambda q, k, v: (f(q, k, v) * w).sum() + (f(q, k, v) ** 2).sum())
  ref = jax.grad(loss(lambda q, k, v: attn.xla_attention(q, k, v, seg, seg)), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: attn.attend(impl, q, k, v, seg, seg, chunk=8)), argnums=(0, 1, 2))(q, k, v)
  for r, g in zip(ref, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('block', [64, 32])
def test_dense_attention_causal_blocks_match_reference(block):
  """Long enough rows skip the key blocks in the causal future: same outputs and gradients."""
  q, k, v = _qkv(t=128, kh=2)
  seg = np.ones((2, 128), np.int32)
  seg[0, 50:] = 2
  seg[1, 100:] = 0
  seg = jnp.asarray(seg)
  f = lambda q, k, v: attn.dense_attention(q, k, v, seg, seg, block=block)
  np.testing.assert_allclose(np.asarray(f(q, k, v)), numpy_attention(q, k, v, seg), atol=2e-5, rtol=1e-4)
  loss = lambda g: (lambda q, k, v: (g(q, k, v) ** 2).sum())
  ref = jax.grad(loss(lambda q, k, v: attn.xla_attention(q, k, v, seg, seg)), argnums=(0, 1, 2))(q, k, v)
  for r, g in zip(ref, jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


def test_auto_attention_picks_per_backend():
  pick = lambda platform, packed=False: attn.select(
      'auto', platform=platform, dtype='bfloat16', head_dim=64, seq_len=256, packed=packed).impl
  assert [pick(p) for p in ('cpu', 'gpu', 'tpu')] == ['dense', 'cudnn', 'splash']
  assert pick('gpu', packed=True) == 'pallas_gpu'
  assert attn.select('xla', platform='tpu', dtype='float32', head_dim=8, seq_len=8, packed=True).impl == 'xla'


def test_auto_attention_on_this_cpu_runs_dense():
  """What `auto` really runs here: the dense implementation, bit for bit."""
  if jax.default_backend() != 'cpu':
    pytest.skip('a CPU-only check')
  q, k, v = _qkv()
  seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 10 + [0] * 4], 2, axis=0).astype(np.int32))
  np.testing.assert_array_equal(np.asarray(attn.attend('auto', q, k, v, seg, seg)),
                                np.asarray(attn.dense_attention(q, k, v, seg, seg)))


@pytest.mark.parametrize('kh, activation', [(4, 'swiglu'), (2, 'swiglu'), (4, 'gelu')])
def test_fused_projections_equal_separate_matmuls(kh, activation):
  """q/k/v (and SwiGLU's two up-projections) run as one matmul: same numbers as one each."""
  import flax.linen as nn
  from fmjax.model.layers import MLP, Projection
  cfg = tiny_config(num_kv_heads=kh, activation=activation, use_bias=True).model
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, cfg.d_model))
  block = attn.Attention(cfg)
  params = block.init(jax.random.PRNGKey(0), x, jnp.broadcast_to(jnp.arange(8), (2, 8)), jnp.ones((2, 8), jnp.int32))
  p = nn.unbox(params['params'])
  d = cfg.d_model // cfg.num_heads
  for name, heads in (('q', cfg.num_heads), ('k', kh), ('v', kh)):
    proj = Projection((cfg.d_model,), (heads, d), ('embed',), ('heads', 'kv'), use_bias=True)
    got = proj.apply({'params': p[name]}, x)
    want = jnp.einsum('btd,dhk->bthk', x, p[name]['kernel']) + p[name]['bias']
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  mlp = MLP(cfg)
  mp = nn.unbox(mlp.init(jax.random.PRNGKey(1), x)['params'])
  if activation == 'swiglu':
    h = jax.nn.silu(x @ mp['wi_0']['kernel'] + mp['wi_0']['bias']) * (x @ mp['wi_1']['kernel'] + mp['wi_1']['bias'])
  else:
    h = jax.nn.gelu(x @ mp['wi']['kernel'] + mp['wi']['bias'], approximate=True)
  want = h @ mp['wo']['kernel'] + mp['wo']['bias']
  np.testing.assert_allclose(np.asarray(mlp.apply({'params': mp}, x)), np.asarray(want), atol=1e-5)


def test_rope_matches_numpy_rotation():
  x = np.random.default_rng(0).normal(size=(1, 5, 2, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 7, 100]], np.int32)
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), 500.0))
  inv = 1.0 / 500.0 ** (np.arange(0, 8, 2) / 8)
  want = np.empty_like(x)
  for t in range(5):
    for i in range(4):  # pair (i, i + 4) rotated by angle pos * inv[i]
      a = pos[0, t] * inv[i]
      x1, x2 = x[0, t, :, i], x[0, t, :, i + 4]
      want[0, t, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
      want[0, t, :, i + 4] = x2 * np.cos(a) + x1 * np.sin(a)
  np.testing.assert_allclose(got, want, atol=1e-5)


def _logits(cfg, tokens, positions=None, segments=None, params=None):
  model = Transformer(cfg.model)
  if params is None:
    params = model.init(jax.random.PRNGKey(0), tokens)['params']
  return model.apply({'params': params}, tokens, positions, segments), params


@pytest.mark.parametrize('attention', ['xla', 'dense', 'chunked'])
def test_packed_document_logits_equal_document_alone(attention):
  """With segment ids, a document's logits do not change when another is packed before it."""
  cfg = tiny_config(attention=attention, attention_chunk=8)
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, 64, 7), rng.integers(0, 64, 9)
  alone, params = _logits(cfg, jnp.asarray(doc_b[None], jnp.int32))
  packed = np.concatenate([doc_a, doc_b])[None]
  seg = np.array([[1] * 7 + [2] * 9])
  pos = np.array([list(range(7)) + list(range(9))])
  got, _ = _logits(cfg, jnp.asarray(packed, jnp.int32), jnp.asarray(pos), jnp.asarray(seg), params)
  np.testing.assert_allclose(np.asarray(got[0, 7:]), np.asarray(alone[0]), atol=1e-5)


def test_scanned_and_unrolled_layers_agree():
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 16)), jnp.int32)
  scanned, params = _logits(tiny_config(scan_layers=True), tokens)
  unrolled_params = layout.scanned_to_unrolled(params, 2)
  assert jax.tree.all(jax.tree.map(np.array_equal, layout.unrolled_to_scanned(unrolled_params, 2), params))
  unrolled, _ = _logits(tiny_config(scan_layers=False), tokens, params=unrolled_params)
  np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), atol=1e-5)


@pytest.mark.parametrize('overrides', [
    dict(activation='gelu', norm='layernorm', positions='learned', use_bias=True, tie_embeddings=True),
    dict(num_kv_heads=1),                      # MQA
    dict(head_dim=16),                         # head_dim * heads != d_model
    dict(dtype='bfloat16'),
])
def test_model_variants_run(overrides):
  cfg = tiny_config(**overrides)
  logits, params = _logits(cfg, jnp.zeros((2, 16), jnp.int32))
  assert logits.shape == (2, 16, 64)
  assert np.isfinite(np.asarray(logits, np.float32)).all()
  if overrides.get('tie_embeddings'):
    assert 'lm_head' not in params and 'pos_embedding' in params


@pytest.mark.parametrize('name', ['llama_1b', 'llama_7b', 'gpt2_124m'])
def test_accelerator_configs_compute_in_bf16_over_fp32_parameters(name):
  """bf16 matmuls, fp32 parameters (so fp32 AdamW state): the precision the GPU/TPU configs promise."""
  import pathlib
  from fmjax import config as config_lib
  path = pathlib.Path(__file__).resolve().parents[2] / 'configs' / f'{name}.py'
  m = config_lib.resolve(str(path)).model
  assert (m.dtype, m.param_dtype) == ('bfloat16', 'float32')
  cfg = tiny_config(dtype=m.dtype, param_dtype=m.param_dtype)
  tokens = jnp.zeros((1, 8), jnp.int32)
  model = Transformer(cfg.model)
  params = model.init(jax.random.PRNGKey(0), tokens)['params']
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {'float32'}
  from fmjax.training import optim
  state = optim.make_optimizer(cfg.optim, cfg.steps).init(params)
  assert {str(x.dtype) for x in jax.tree.leaves(state) if x.ndim} == {'float32'}
