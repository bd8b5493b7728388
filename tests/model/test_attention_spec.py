"""The attention score spec: sliding windows, logit soft-caps and the score scale in every
implementation, against a float64 NumPy reference (forward and gradients, packed segments); the
choice of implementation by spec; the spec of a model config."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.model import attention as attn
from fmjax.model import attention_spec as spec_lib
from fmjax.model import splash
from fmjax.model.attention_spec import ScoreSpec
from helpers import tiny_config


def _inputs(b=2, t=24, h=4, kh=2, d=8, seed=0, spread=1.5):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(s) for s in ((b, t, h, d), (b, t, kh, d), (b, t, kh, d)))
  return q * spread, k * spread, v   # spread: scores large enough for a soft-cap to bite


def _packed(b, t):
  """Rows of several documents then padding (segment 0)."""
  seg = np.ones((b, t), np.int32)
  seg[0, t // 3:] = 2
  seg[0, 2 * t // 3:] = 3
  if b > 1:
    seg[1, t // 2:] = 2
    seg[1, t - 3:] = 0
  return seg


def reference(q, k, v, seg, spec: ScoreSpec, d_out=None):
  """float64 attention under `spec`, head by head, and (given d_out) its gradients by the chain rule:
  dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)) (1 - tanh^2 with a soft-cap), dQ = scale dS K,
  dK = scale dS^T Q."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  for bi in range(b):
    mask = seg[bi][:, None] == seg[bi][None, :]
    if spec.causal:
      mask &= j <= i
    if spec.sliding_window:
      mask &= i - j < spec.sliding_window
    for hi in range(h):
      kv = hi // g
      s = spec.scale * q[bi, :, hi] @ k[bi, :, kv].T
      if spec.logit_softcap:
        tanh = np.tanh(s / spec.logit_softcap)
        s = spec.logit_softcap * tanh
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, kv]
      if d_out is None:
        continue
      do = d_out[bi, :, hi]
      dv[bi, :, kv] += p.T @ do
      dp = do @ v[bi, :, kv].T
      ds = p * (dp - (p * dp).sum(-1, keepdims=True))
      if spec.logit_softcap:
        ds *= 1.0 - tanh ** 2
      dq[bi, :, hi] = spec.scale * ds @ k[bi, :, kv]
      dk[bi, :, kv] += spec.scale * ds.T @ q[bi, :, hi]
  return out if d_out is None else (out, (dq, dk, dv))


def test_the_reference_gradients_are_the_derivative_of_the_reference():
  """The hand-derived NumPy backward agrees with central finite differences of the NumPy forward."""
  q, k, v = _inputs(b=1, t=6, h=2, kh=1, d=4, seed=5)
  seg = np.array([[1, 1, 1, 2, 2, 0]])
  spec = ScoreSpec(causal=True, scale=0.7, sliding_window=2, logit_softcap=1.2)
  w = np.random.default_rng(6).standard_normal(q.shape)
  _, grads = reference(q, k, v, seg, spec, w)
  for x, gx in zip((q, k, v), grads):
    for idx in [(0, 3, 0, 1), (0, 4, 0, 2), (0, 1, 0, 3)]:
      step = np.zeros_like(x)
      step[idx] = 1e-6
      args = [a + step if a is x else a for a in (q, k, v)]
      up = (reference(*args, seg, spec) * w).sum()
      args = [a - step if a is x else a for a in (q, k, v)]
      down = (reference(*args, seg, spec) * w).sum()
      assert abs((up - down) / 2e-6 - gx[idx]) < 1e-6


SPECS = [
    ScoreSpec(causal=True, scale=8 ** -0.5, sliding_window=5),
    ScoreSpec(causal=True, scale=8 ** -0.5, logit_softcap=1.0),
    ScoreSpec(causal=True, scale=0.6, sliding_window=3, logit_softcap=2.0),   # and a scale of its own
    ScoreSpec(causal=False, scale=0.6, logit_softcap=1.5),
]


@pytest.mark.parametrize('impl', ['xla', 'dense', 'chunked'])
@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.describe())
def test_features_match_the_float64_reference_forward_and_gradients(impl, spec):
  q, k, v = _inputs()
  seg = _packed(2, 24)
  w = np.random.default_rng(1).standard_normal(q.shape)
  want, want_grads = reference(q, k, v, seg, spec, w)
  plain = reference(q, k, v, seg, ScoreSpec(causal=spec.causal, scale=8 ** -0.5))
  assert np.abs(want - plain).max() > 0.05          # the features change the result: ignoring them fails
  segs = jnp.asarray(seg)
  f = lambda q, k, v: attn.attend(impl, q, k, v, segs, segs, chunk=8, spec=spec)
  args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))
  np.testing.assert_allclose(np.asarray(f(*args)), want, atol=2e-5, rtol=1e-4)
  grads = jax.grad(lambda *a: (f(*a) * jnp.asarray(w, jnp.float32)).sum(), argnums=(0, 1, 2))(*args)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), ref, atol=5e-5, rtol=1e-4)


def test_dense_key_blocks_and_chunked_block_skipping_under_a_window():
  """The dense path's causal key blocks (4 blocks of 32) and chunked's skipped blocks before the window."""
  q, k, v = _inputs(b=1, t=128, seed=3)
  seg = _packed(1, 128)
  spec = ScoreSpec(causal=True, scale=8 ** -0.5, sliding_window=20, logit_softcap=2.5)
  w = np.random.default_rng(4).standard_normal(q.shape)
  want, want_grads = reference(q, k, v, seg, spec, w)
  segs = jnp.asarray(seg)
  args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))
  for f in (lambda q, k, v: attn.dense_attention(q, k, v, segs, segs, block=32, spec=spec),
            lambda q, k, v: attn.chunked_attention(q, k, v, segs, segs, chunk=16, spec=spec)):
    np.testing.assert_allclose(np.asarray(f(*args)), want, atol=2e-5, rtol=1e-4)
    grads = jax.grad(lambda *a: (f(*a) * jnp.asarray(w, jnp.float32)).sum(), argnums=(0, 1, 2))(*args)
    for got, ref in zip(grads, want_grads):
      np.testing.assert_allclose(np.asarray(got), ref, atol=5e-5, rtol=1e-4)


def test_splash_applies_window_and_soft_cap_in_interpret_mode():
  """The TPU kernel's local mask and soft-cap (Pallas interpreter): 2 tiles, the window across them."""
  q, k, v = _inputs(b=1, t=256, h=2, kh=1, d=128, seed=7, spread=1.0)
  seg = _packed(1, 256)                               # documents of 85 tokens: a window of 40 bites
  spec = ScoreSpec(causal=True, scale=0.25, sliding_window=40, logit_softcap=2.0)
  w = np.random.default_rng(8).standard_normal(q.shape)
  want, want_grads = reference(q, k, v, seg, spec, w)
  for partial in (dict(sliding_window=40), dict(logit_softcap=2.0)):   # either feature alone matters
    assert np.abs(want - reference(q, k, v, seg, ScoreSpec(causal=True, scale=0.25, **partial))).max() > 0.05
  segs = jnp.asarray(seg)
  f = lambda q, k, v: splash.splash_attention(q, k, v, segs, segs, block=128, interpret=True, spec=spec)
  args = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))
  np.testing.assert_allclose(np.asarray(f(*args)), want, atol=1e-4, rtol=1e-3)
  grads = jax.grad(lambda *a: (f(*a) * jnp.asarray(w, jnp.float32)).sum(), argnums=(0, 1, 2))(*args)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-4, rtol=1e-3)


def test_every_implementation_reads_the_scale_from_the_spec():
  """A scale other than 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar) reaches each kernel."""
  q, k, v = _inputs(b=1, t=128, h=2, kh=2, d=16, seed=9)
  seg = np.ones((1, 128), np.int32)
  seg[0, 70:] = 2
  spec = ScoreSpec(causal=True, scale=0.9)
  want = reference(q, k, v, seg, spec)
  assert np.abs(want - reference(q, k, v, seg, ScoreSpec(causal=True, scale=0.25))).max() > 0.05
  segs = jnp.asarray(seg)
  q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  outs = {impl: attn.attend(impl, q32, k32, v32, segs, segs, chunk=32, spec=spec)
          for impl in ('xla', 'dense', 'chunked')}
  outs['splash'] = splash.splash_attention(q32, k32, v32, segs, segs, block=128, interpret=True, spec=spec)
  outs['pallas_gpu'] = splash.gpu_flash_attention(q32, k32, v32, segs, segs, interpret=True, spec=spec)
  one_doc = jnp.ones((1, 128), jnp.int32)       # cuDNN's path: one document per row
  outs['cudnn'] = attn.cudnn_attention(q32, k32, v32, one_doc, one_doc, implementation='xla', spec=spec)
  whole = reference(q, k, v, np.ones((1, 128), np.int32), spec)
  for impl, out in outs.items():
    np.testing.assert_allclose(np.asarray(out), whole if impl == 'cudnn' else want, atol=1e-4, rtol=1e-3,
                               err_msg=impl)


def test_kernels_that_cannot_apply_a_feature_refuse_it():
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _inputs(b=1, t=128, h=2, kh=2, d=16))
  seg = jnp.ones((1, 128), jnp.int32)
  spec = ScoreSpec(causal=True, scale=0.25, sliding_window=8)
  with pytest.raises(ValueError, match="'pallas_gpu' cannot apply sliding_window"):
    splash.gpu_flash_attention(q, k, v, seg, seg, interpret=True, spec=spec)
  with pytest.raises(ValueError, match="'cudnn' cannot apply sliding_window"):
    attn.cudnn_attention(q, k, v, seg, seg, implementation='xla', spec=spec)
  with pytest.raises(ValueError, match='causal=False contradicts'):
    attn.attend('xla', q, k, v, seg, seg, causal=False, spec=spec)


GPU = dict(platform='gpu', dtype='bfloat16', head_dim=64, seq_len=256, packed=False)
WINDOW = ScoreSpec(causal=True, scale=0.125, sliding_window=64)
CAPPED = ScoreSpec(causal=True, scale=0.125, logit_softcap=50.0)


@pytest.mark.parametrize('where, spec, impl, why', [
    (GPU, WINDOW, 'dense', 'not cudnn: it cannot apply sliding_window'),
    ({**GPU, 'packed': True}, CAPPED, 'dense', 'not pallas_gpu: it cannot apply logit_softcap'),
    ({**GPU, 'platform': 'tpu'}, WINDOW, 'splash', 'splash'),
    ({**GPU, 'platform': 'cpu'}, CAPPED, 'dense', 'cpu'),
    (GPU, ScoreSpec(causal=True, scale=0.125), 'cudnn', 'cuDNN'),
])
def test_auto_picks_an_implementation_that_applies_the_spec_and_says_why(where, spec, impl, why):
  choice = attn.select('auto', **where, spec=spec)
  assert choice.impl == impl and why in choice.reason, choice
  assert '\n' not in choice.line()


@pytest.mark.parametrize('impl', ['cudnn', 'pallas_gpu'])
def test_an_explicit_implementation_that_cannot_apply_the_spec_is_one_line_error(impl):
  with pytest.raises(attn.AttentionError, match=f'model.attention={impl} cannot apply sliding_window') as err:
    attn.select(impl, **{**GPU, 'packed': impl == 'pallas_gpu'}, spec=WINDOW)
  message = str(err.value)
  assert '\n' not in message and 'model.attention=auto' in message and 'dense' in message and 'splash' in message
  assert attn.select('chunked', **GPU, spec=WINDOW).impl == 'chunked'


def test_an_unresolved_auto_call_with_a_window_runs_dense_and_logs_why(caplog):
  attn._log_once.cache_clear()
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _inputs())
  seg = jnp.asarray(_packed(2, 24))
  spec = ScoreSpec(causal=True, scale=8 ** -0.5, sliding_window=4)
  with caplog.at_level(logging.INFO, logger='fmjax.model.attention'):
    out = attn.attend('auto', q, k, v, seg, seg, spec=spec)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(attn.dense_attention(q, k, v, seg, seg, spec=spec)))
  assert [r.getMessage() for r in caplog.records] == ['attention: dense (fastest exact implementation on cpu)']


def test_spec_of_a_model_config_and_its_checks():
  dec = tiny_config(num_heads=4, d_model=32).model
  assert spec_lib.score_spec(dec) == ScoreSpec(causal=True, scale=8 ** -0.5)
  assert spec_lib.layer_specs(dec) == (spec_lib.score_spec(dec),) * dec.num_layers
  enc = tiny_config(kind='encoder', head_dim=16).model
  assert spec_lib.score_spec(enc) == ScoreSpec(causal=False, scale=0.25)
  assert spec_lib.score_spec(dec).features() == () and WINDOW.features() == ('sliding_window',)
  with pytest.raises(ValueError, match='causal attention only'):
    ScoreSpec(causal=False, scale=0.5, sliding_window=4)
  with pytest.raises(ValueError, match='positive integer'):
    ScoreSpec(causal=True, scale=0.5, sliding_window=0)
  with pytest.raises(ValueError, match='logit_softcap must be positive'):
    ScoreSpec(causal=True, scale=0.5, logit_softcap=0.0)


@pytest.mark.parametrize('spec, t', [(ScoreSpec(causal=True, scale=1.0), 9), (ScoreSpec(causal=False, scale=1.0), 9),
                                     (ScoreSpec(causal=True, scale=1.0, sliding_window=4), 9),
                                     (ScoreSpec(causal=True, scale=1.0, sliding_window=20), 9)])
def test_mean_keys_counts_the_visible_keys_of_the_mask(spec, t):
  """The FLOP formula's keys per query equal the pairs the attention mask lets through, per query."""
  index = jnp.arange(t)
  seg = jnp.ones((1, t), jnp.int32)
  pairs = int(np.asarray(spec_lib.visible(spec, index, index, seg, seg)).sum())
  assert spec_lib.mean_keys(spec, t) == pytest.approx(pairs / t, rel=1e-12)
