"""Quantized training (model.quantization): the int8 / fp8 matmuls equal a NumPy formula, quantize exactly
the projections, stay close to the unquantized model, train on a mesh, and keep fp32 weights."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from fmjax.config import ConfigError, validate
from fmjax.model import Transformer, quantization
from fmjax.model.layers import Projection
from fmjax.training import build
from fmjax.parallel import sharding as shd
from helpers import synthetic_batch, tiny_config, with_fields


class OneProjection(nn.Module):
  cfg: object

  @nn.compact
  def __call__(self, x):
    return Projection((16,), (4, 8), ('embed',), ('heads', 'kv'), name='q')(x)


def _exact_scale_inputs(rng, rows, cols, bound, axis):
  """Random values whose absmax along `axis` is exactly bound * 2^-k, so every scale absmax / bound is a
  power of two and x / scale is exact: the NumPy formula and XLA then agree bit for bit."""
  x = rng.standard_normal((rows, cols)).astype(np.float32)
  x /= np.abs(x).max(axis=axis, keepdims=True)
  x *= np.float32(0.99)                                          # every other |value| below the max
  k = rng.integers(3, 8, size=x.shape[1 - axis])
  peak = np.float32(bound) * np.exp2(-k).astype(np.float32)
  idx = np.abs(x).argmax(axis=axis)
  if axis == 1:
    x *= peak[:, None]
    x[np.arange(rows), idx] = np.sign(x[np.arange(rows), idx]) * peak
  else:
    x *= peak[None, :]
    x[idx, np.arange(cols)] = np.sign(x[idx, np.arange(cols)]) * peak
  return x


def _numpy_quantized_matmul(x, w, qtype):
  """Per-channel absmax quantization (rows of x, columns of w), the product of the quantized values in
  float64, rescaled: int8 rounds half to even into [-128, 127] with bound 127.5; fp8 casts to e4m3."""
  if qtype == 'int8':
    bound = 127.5
    cast = lambda v: np.clip(np.round(v), -128, 127)
  else:
    bound = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    cast = lambda v: v.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  sx = np.abs(x).max(axis=1, keepdims=True) / np.float32(bound)
  sw = np.abs(w).max(axis=0, keepdims=True) / np.float32(bound)
  return (cast(x / sx) @ cast(w / sw)) * sx.astype(np.float64) * sw.astype(np.float64)


@pytest.mark.parametrize('qtype,bound', [('int8', 127.5), ('fp8', 448.0)])
def test_projection_matmul_equals_the_numpy_formula(qtype, bound):
  rng = np.random.default_rng(0)
  x = _exact_scale_inputs(rng, 6, 16, bound, axis=1)
  w = _exact_scale_inputs(rng, 16, 32, bound, axis=0)
  module = OneProjection(ml_collections.ConfigDict({'quantization': qtype}))
  params = {'params': {'q': {'kernel': jnp.asarray(w.reshape(16, 4, 8))}}}
  quantized = quantization.quantize(module, 'cpu')
  y = np.asarray(quantized.apply(params, jnp.asarray(x.reshape(2, 3, 16)))).reshape(6, 32)
  ref = _numpy_quantized_matmul(x, w, qtype)
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)
  plain = np.asarray(module.apply(params, jnp.asarray(x.reshape(2, 3, 16)))).reshape(6, 32)
  assert np.abs(plain - ref).max() > 100 * np.abs(y - ref).max()     # the formula is not the float product


def _model_cfg(quantization_kind, **overrides):
  model = dict(d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=128, vocab_size=128, max_seq_len=32,
               quantization=quantization_kind)
  cfg = with_fields(tiny_config(**{**model, **overrides}), seq_len=32)
  return validate(cfg)


def _quantized_dots(lowered_text: str, dtype: str) -> int:
  """dot_general ops whose two operands are `dtype` tensors in a lowered (StableHLO) program."""
  return sum(1 for line in lowered_text.splitlines()
             if 'stablehlo.dot_general' in line and len(re.findall(rf'tensor<[^>]*x{dtype}>', line)) >= 2)


@pytest.mark.parametrize('kind,dtype,num_kv_heads', [('int8', 'i8', 4), ('fp8', 'f8E4M3FN', 2)],
                         ids=['int8-mha', 'fp8-gqa'])
def test_exactly_the_projection_matmuls_are_quantized(kind, dtype, num_kv_heads):
  """q, k, v, o, wi_0, wi_1, wo: 7 per block (one scanned body), in the forward pass; the scores, the
  embedding and the head stay in float."""
  cfg = _model_cfg(kind, num_kv_heads=num_kv_heads)
  model = quantization.quantize(Transformer(cfg.model), 'cpu')
  tokens = jnp.zeros((2, 32), jnp.int32)
  params = Transformer(cfg.model).init(jax.random.PRNGKey(0), tokens)['params']
  text = jax.jit(lambda p, t: model.apply({'params': p}, t)).lower(params, tokens).as_text()
  assert _quantized_dots(text, dtype) == 7
  plain = jax.jit(lambda p, t: Transformer(cfg.model).apply({'params': p}, t)).lower(params, tokens).as_text()
  assert _quantized_dots(plain, dtype) == 0


@pytest.mark.parametrize('kind,limit', [('int8', 0.03), ('fp8', 0.08)])
def test_forward_is_within_the_stated_tolerance_of_bf16_compute(kind, limit):
  """The default model's shape: quantized logits (fp32 elsewhere) differ from fp32 by a relative RMS
  under `limit` (int8 3 %, fp8 8 %), and by more than bf16 compute does (it really is quantized)."""
  cfg = with_fields(tiny_config(), seq_len=128)
  cfg.model.update(vocab_size=259, d_model=128, num_layers=4, num_heads=4, num_kv_heads=0, mlp_dim=512,
                   max_seq_len=128)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 128), 0, 259)
  params = Transformer(cfg.model).init(jax.random.PRNGKey(0), tokens)['params']

  def logits(**model):
    m = cfg.model.copy_and_resolve_references()
    m.update(model)
    out = quantization.quantize(Transformer(m), 'cpu').apply({'params': params}, tokens)
    return np.asarray(out, np.float64)

  ref = logits()
  rel = lambda out: np.sqrt(((out - ref) ** 2).mean() / (ref ** 2).mean())
  bf16, quantized = rel(logits(dtype='bfloat16')), rel(logits(quantization=kind))
  assert bf16 < quantized < limit, (bf16, quantized)


def _train(cfg, mesh_shape, steps=4):
  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_shape))])
  run = build.build_lm_run(cfg, mesh)
  state = run.init(jax.random.PRNGKey(cfg.seed))
  losses = []
  for i in range(steps):
    batch = synthetic_batch(cfg.global_batch_size, cfg.seq_len, cfg.model.vocab_size, seed=i % 2)
    state, metrics = run.train_step(state, {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()})
    losses.append(float(metrics['loss']))
  return losses, state


@pytest.mark.slow   # three runs built and compiled: with the slow suite (CI runs both)
def test_int8_trains_on_a_2x2x2_mesh_like_one_device_with_fp32_master_weights():
  cfg = _model_cfg('int8')
  one, state = _train(cfg, (1, 1, 1))
  mesh_cfg = with_fields(cfg, mesh=dict(data=2, fsdp=2, tensor=2))
  eight, mesh_state = _train(mesh_cfg, (2, 2, 2))
  np.testing.assert_allclose(eight, one, rtol=2e-3)
  assert one[-1] < one[0]
  plain, _ = _train(_model_cfg('none'), (1, 1, 1))
  assert one != plain and abs(one[-1] - plain[-1]) / plain[-1] < 0.02
  for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(mesh_state.opt_state):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  q = mesh_state.params['layers']['attn']['q']['kernel']
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)      # sharded as unquantized


def test_unknown_quantization_is_one_line():
  cfg = tiny_config()
  cfg.model.quantization = 'int4'
  with pytest.raises(ConfigError, match=r"^model\.quantization='int4' is not one of none, int8, fp8$"):
    validate(cfg)


class _Gpu:
  platform = 'gpu'

  def __init__(self, kind, capability):
    self.device_kind, self.compute_capability = kind, capability


def test_fp8_is_refused_on_a_gpu_without_fp8_matmuls():
  with pytest.raises(ValueError) as err:
    quantization.check_backend('fp8', 'gpu', _Gpu('NVIDIA A100-SXM4-80GB', '8.0'))
  assert str(err.value).count('\n') == 0 and 'compute capability 8.9' in str(err.value)
  assert 'A100' in str(err.value) and 'int8' in str(err.value)
  quantization.check_backend('fp8', 'gpu', _Gpu('NVIDIA H200', '9.0'))     # Hopper: allowed
  quantization.check_backend('int8', 'gpu', _Gpu('NVIDIA A100-SXM4-80GB', '8.0'))
  quantization.check_backend('fp8', 'cpu', jax.devices()[0])              # emulated on CPU
