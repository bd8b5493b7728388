"""The GPU attention path, checked on CPU through the same calls, and the GPU XLA flags.

`cudnn_attention(..., implementation='xla')` is the exact `jax.nn.dot_product_attention` call
the cuDNN path makes (causal mode, per-row lengths) and `gpu_flash_attention(interpret=True)`
the Pallas GPU kernel the packed path runs; both are compared with a NumPy reference (float64,
forward and hand-derived gradients). On a GPU host `FMJAX_TEST_CUDNN=1` (tools/gpu_check.sh)
adds the real cuDNN / Triton variants in bf16.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.runtime import gpu_flags
from fmjax.model import attention as attn
from fmjax.model import splash
from helpers import tiny_config

ON_GPU = jax.default_backend() == 'gpu'
WANT_GPU_KERNELS = os.environ.get('FMJAX_TEST_CUDNN') == '1'
B, T, H, D = 3, 32, 4, 16


def _gpu_kernels():
  if not WANT_GPU_KERNELS:
    pytest.skip('the real cuDNN / Triton kernels run with FMJAX_TEST_CUDNN=1 on a GPU (tools/gpu_check.sh)')
  if not ON_GPU:
    pytest.skip(f'FMJAX_TEST_CUDNN=1 but the backend is {jax.default_backend()}, not gpu')


def numpy_attention(q, k, v, seg, w):
  """Causal, same-segment attention and the gradients of sum(out * w), in float64, per head."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  seg = np.asarray(seg)
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  for bi in range(b):
    mask = np.tril(np.ones((t, t), bool)) & (seg[bi][:, None] == seg[bi][None, :])
    for hi in range(h):
      kv = hi // g
      s = np.where(mask, q[bi, :, hi] @ k[bi, :, kv].T / np.sqrt(d), -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, kv]
      do = w[bi, :, hi]
      dp = do @ v[bi, :, kv].T
      ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
      dq[bi, :, hi] = ds @ k[bi, :, kv]
      dk[bi, :, kv] += ds.T @ q[bi, :, hi]
      dv[bi, :, kv] += p.T @ do
  return out, (dq, dk, dv)


def _inputs(kh, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (B, T, H, D), dtype)
  k = jax.random.normal(ks[1], (B, T, kh, D), dtype)
  v = jax.random.normal(ks[2], (B, T, kh, D), dtype)
  w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
  return q, k, v, w


def _one_document_rows():
  """Each row: one document, then padding (segment 0), as data.packing=false and fine-tuning feed."""
  seg = np.zeros((B, T), np.int32)
  for row, n in enumerate((T, 21, 5)):
    seg[row, :n] = 1
  return seg


def _packed_rows():
  """Several documents per row and a padded tail, as the concat-then-split packer feeds."""
  seg = np.ones((B, T), np.int32)
  seg[0, 9:] = 2
  seg[0, 20:] = 3
  seg[0, 27:] = 0
  seg[1, 16:] = 2
  return seg


def _check(fn, q, k, v, w, seg, atol, rtol):
  """fn's outputs and gradients of sum(out * w) against NumPy, on non-padding queries (the loss
  weights padding 0, so padded query rows are outputs nothing reads)."""
  real = (seg != 0)[:, :, None, None]
  w = jnp.asarray(np.where(real, np.asarray(w), 0.0))
  want_out, want_grads = numpy_attention(q, k, v, seg, w)
  f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
  got_out = f32(fn(q, k, v))
  np.testing.assert_allclose(np.where(real, got_out, 0), np.where(real, want_out, 0), atol=atol, rtol=rtol)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  for name, got, want in zip('qkv', jax.grad(loss, argnums=(0, 1, 2))(q, k, v), want_grads):
    np.testing.assert_allclose(f32(got), want, atol=atol, rtol=rtol, err_msg=f'd{name}')


# ------------------------------------------------------------------ the GPU calls

@pytest.mark.parametrize('kh', [4, 2, 1], ids=['mha', 'gqa', 'mqa'])
def test_cudnn_call_with_xla_equals_numpy_on_padded_rows(kh):
  """The cuDNN path's call (causal mode, lengths), run by XLA in fp32: exact on one-document rows."""
  q, k, v, w = _inputs(kh)
  seg = jnp.asarray(_one_document_rows())
  fn = lambda q, k, v: attn.cudnn_attention(q, k, v, seg, seg, implementation='xla')
  _check(fn, q, k, v, w, np.asarray(seg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kh', [4, 2, 1], ids=['mha', 'gqa', 'mqa'])
def test_gpu_flash_kernel_interpreted_equals_numpy_on_packed_rows(kh):
  """The Pallas GPU kernel `auto` picks for packed rows, in the Pallas interpreter, fp32."""
  q, k, v, w = _inputs(kh)
  seg = jnp.asarray(_packed_rows())
  fn = lambda q, k, v: splash.gpu_flash_attention(q, k, v, seg, seg, interpret=True)
  _check(fn, q, k, v, w, np.asarray(seg), atol=1e-5, rtol=1e-5)


def test_cudnn_call_cannot_separate_packed_documents():
  """Why `auto` does not pick cudnn for packed rows: one length per row lets documents see each other."""
  q, k, v, w = _inputs(4)
  seg = _packed_rows()
  got = attn.cudnn_attention(q, k, v, jnp.asarray(seg), jnp.asarray(seg), implementation='xla')
  want, _ = numpy_attention(q, k, v, seg, w)
  second_doc = slice(9, 20)
  assert np.abs(np.asarray(got)[0, second_doc] - want[0, second_doc]).max() > 0.1


@pytest.mark.parametrize('kh', [4, 2, 1], ids=['mha', 'gqa', 'mqa'])
def test_real_cudnn_kernel_equals_numpy_bf16(kh):
  _gpu_kernels()
  q, k, v, w = _inputs(kh, jnp.bfloat16)
  seg = jnp.asarray(_one_document_rows())
  fn = lambda q, k, v: attn.cudnn_attention(q, k, v, seg, seg, implementation='cudnn')
  _check(fn, q, k, v, w, np.asarray(seg), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize('kh', [4, 1], ids=['mha', 'mqa'])
def test_real_gpu_flash_kernel_equals_numpy_bf16(kh):
  _gpu_kernels()
  q, k, v, w = _inputs(kh, jnp.bfloat16)
  seg = jnp.asarray(_packed_rows())
  fn = lambda q, k, v: splash.gpu_flash_attention(q, k, v, seg, seg)
  _check(fn, q, k, v, w, np.asarray(seg), atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------ the choice

GPU = dict(platform='gpu', dtype='bfloat16', head_dim=64, seq_len=2048, packed=False)


@pytest.mark.parametrize('change, impl, why', [
    ({}, 'cudnn', 'one document per row'),
    (dict(packed=True), 'pallas_gpu', 'data.packing=true'),
    (dict(packed=True, seq_len=1000), 'dense', 'data.packing=true'),
    (dict(dtype='float32'), 'dense', 'model.dtype=float32'),
    (dict(head_dim=160), 'pallas_gpu', 'head dim'),
    (dict(head_dim=160, hopper=True), 'cudnn', 'one document per row'),
    (dict(platform='cpu'), 'dense', 'cpu'),
    (dict(platform='tpu'), 'splash', 'TPU'),
    (dict(platform='tpu', seq_len=1000), 'dense', 'seq_len=1000'),
])
def test_auto_selection(change, impl, why):
  choice = attn.select('auto', **{**GPU, **change})
  assert choice.impl == impl and why in choice.reason
  assert choice.line().startswith(f'attention: {impl} (') and '\n' not in choice.line()


@pytest.mark.parametrize('change, message', [
    (dict(dtype='float32'), 'needs bfloat16/float16 compute and model.dtype=float32'),
    (dict(platform='cpu'), 'needs an NVIDIA GPU and the backend is cpu'),
    (dict(head_dim=12), 'multiple of 8 and <= 128, got 12'),
    (dict(packed=True), 'data.packing=true'),
])
def test_explicit_cudnn_that_cannot_run_is_one_line_error(change, message):
  with pytest.raises(attn.AttentionError, match=message) as err:
    attn.select('cudnn', **{**GPU, **change})
  assert '\n' not in str(err.value) and 'model.attention=auto' in str(err.value)
  assert attn.select('xla', **{**GPU, **change}).impl == 'xla'  # other explicit names are kept


@pytest.mark.parametrize('impl, platform', [('pallas_gpu', 'cpu'), ('pallas_gpu', 'tpu'), ('splash', 'gpu')])
def test_explicit_kernel_on_the_wrong_platform_is_one_line_error(impl, platform):
  with pytest.raises(attn.AttentionError, match=f'model.attention={impl} needs a .* the backend is {platform}'):
    attn.select(impl, **{**GPU, 'platform': platform})


def test_explicit_cudnn_model_on_cpu_fails_at_init():
  from fmjax.model import Transformer
  cfg = tiny_config(attention='cudnn').model
  with pytest.raises(attn.AttentionError, match='the backend is cpu'):
    Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


def test_auto_choice_is_logged_once(caplog):
  """`for_run` logs the choice once; tracing the model again (init, apply) logs nothing more."""
  from fmjax.model import Transformer
  attn._log_once.cache_clear()
  cfg = tiny_config(attention='auto').model
  with caplog.at_level(logging.INFO, logger='fmjax.model.attention'):
    resolved = attn.for_run(cfg, seq_len=16, packed=True)
    model = Transformer(resolved)
    tokens = jnp.zeros((2, 16), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)
    model.apply(params, tokens[:, :8])
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('attention:')]
  assert lines == ['attention: dense (fastest exact implementation on cpu)']
  assert resolved.attention == 'dense' and cfg.attention == 'auto'  # the run's config is untouched


def test_unresolved_auto_logs_once_and_assumes_packing(caplog):
  attn._log_once.cache_clear()
  q, k, v, _ = _inputs(2)
  seg = jnp.asarray(_packed_rows())
  with caplog.at_level(logging.INFO, logger='fmjax.model.attention'):
    for _ in range(3):
      attn.attend('auto', q, k, v, seg, seg)
  assert [r.getMessage() for r in caplog.records] == ['attention: dense (fastest exact implementation on cpu)']


# ------------------------------------------------------------------ GPU XLA flags

def test_gpu_flags_only_on_gpu_and_user_flags_win():
  assert gpu_flags.gpu_environment({}, 'cpu') == {}
  assert gpu_flags.gpu_environment({}, 'tpu') == {}
  env = {'XLA_FLAGS': '--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/d'}
  got = gpu_flags.gpu_environment(env, 'gpu', extra='--xla_gpu_enable_command_buffer=FUSION '
                                  '--xla_gpu_enable_triton_gemm=maybe')
  flags = got['XLA_FLAGS'].split()
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags
  assert '--xla_gpu_enable_command_buffer=FUSION' in flags           # config beats fmjax's default
  assert '--xla_gpu_enable_triton_gemm=true' in flags                # the environment beats both
  assert '--xla_dump_to=/tmp/d' in flags
  assert len(flags) == len({f.split('=')[0] for f in flags}) == len(gpu_flags.DEFAULT_FLAGS) + 1
  assert got['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'


def test_gpu_flags_opt_outs_and_memory_fraction():
  assert gpu_flags.gpu_environment({'FMJAX_GPU_FLAGS': '0'}, 'gpu') == {}
  assert gpu_flags.gpu_environment({}, 'gpu', enabled=False) == {}
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in gpu_flags.gpu_environment(
      {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.5'}, 'gpu')
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in gpu_flags.gpu_environment({}, 'gpu', memory_fraction=0)
  assert gpu_flags.gpu_environment({}, 'gpu', memory_fraction=0.95)['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.95'


def test_apply_sets_the_environment_from_config_and_logs(caplog):
  cfg = tiny_config()
  cfg.gpu_extra_xla_flags = '--xla_gpu_enable_while_loop_double_buffering=false'
  env = {'XLA_FLAGS': '--xla_dump_to=/x'}
  with caplog.at_level(logging.INFO, logger='fmjax.runtime.gpu_flags'):
    assert gpu_flags.apply(cfg, env, platform='cpu') == {} and env == {'XLA_FLAGS': '--xla_dump_to=/x'}
    set_ = gpu_flags.apply(cfg, env, platform='gpu')
  assert env['XLA_FLAGS'] == set_['XLA_FLAGS'] and env['XLA_FLAGS'].endswith('--xla_dump_to=/x')
  assert '--xla_gpu_enable_while_loop_double_buffering=false' in env['XLA_FLAGS'].split()
  assert [r.getMessage()[:15] for r in caplog.records] == ['gpu: XLA_FLAGS=']


def test_detect_platform_without_starting_jax():
  assert gpu_flags.detect_platform({'JAX_PLATFORMS': 'cuda,cpu'}) == 'gpu'
  assert gpu_flags.detect_platform({'JAX_PLATFORMS': 'cpu'}) == 'cpu'


def test_every_default_flag_exists_in_this_jaxlib():
  """XLA aborts on an unknown XLA_FLAGS entry, so a clean start proves every name exists."""
  env = {**os.environ, 'XLA_FLAGS': ' '.join(gpu_flags.DEFAULT_FLAGS), 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-c', 'import jax.numpy as jnp; print(float(jnp.ones(3).sum()))'],
                     env=env, capture_output=True, text=True, timeout=120)
  assert (r.returncode, r.stdout.strip()) == (0, '3.0'), r.stderr[-2000:]
  bogus = subprocess.run([sys.executable, '-c', 'import jax.numpy as jnp; jnp.ones(3).sum()'],
                         env={**env, 'XLA_FLAGS': '--xla_gpu_no_such_flag=true'}, capture_output=True,
                         text=True, timeout=120)
  assert bogus.returncode != 0 and 'Unknown flag' in bogus.stderr


def test_gpu_flags_cli_prints_assignments():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'XLA_PYTHON_CLIENT_MEM_FRACTION')}
  r = subprocess.run([sys.executable, '-m', 'fmjax.runtime.gpu_flags', '--platform', 'gpu'], env=env,
                     capture_output=True, text=True, timeout=60)
  lines = r.stdout.splitlines()
  assert r.returncode == 0
  assert [line.split('=')[0] for line in lines] == ['XLA_FLAGS', 'XLA_PYTHON_CLIENT_MEM_FRACTION']
  assert lines[0] == 'XLA_FLAGS=' + ' '.join(gpu_flags.DEFAULT_FLAGS)
