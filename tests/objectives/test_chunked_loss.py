"""Vocab-chunked cross-entropy: values and gradients equal the full-logits loss, which is never built."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax.objectives.chunked_ce import chunked_cross_entropy
from fmjax.training.step import cross_entropy


def _inputs(n, d, v, dtype=jnp.float32, transpose=True, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((n, d), np.float32), dtype)
  shape = (v, d) if transpose else (d, v)
  embedding = jnp.asarray(2.0 * rng.standard_normal(shape, np.float32) / np.sqrt(d), dtype)
  targets = jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)
  weights = rng.uniform(0.5, 2.0, (n,)).astype(np.float32)
  weights[::5] = 0.0  # some masked tokens
  return hidden, embedding, targets, jnp.asarray(weights)


def _reference(hidden, embedding, targets, weights, z_loss=0.0, transpose=True):
  w = embedding.astype(hidden.dtype)
  logits = jnp.dot(hidden, w.T if transpose else w, preferred_element_type=jnp.float32)
  return cross_entropy(logits, targets, weights, z_loss)


def _objective(loss_fn, **kw):
  """Jitted ((objective, (ce_sum, z_sum, weight_sum)), grads wrt (hidden, embedding, weights)).

  The objective mixes all three outputs, so each output's cotangent is exercised.
  """
  def f(hidden, embedding, weights, targets):
    sums = loss_fn(hidden, embedding, targets, weights, **kw)
    ce, z, w = sums
    return 1.3 * ce + 0.7 * z + 0.1 * w, sums
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


def _assert_close(got, want, rtol, atol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize('v,chunk,z_loss,transpose', [
    (1000, 256, 0.0, True),     # V not a multiple of chunk
    (1000, 256, 1e-4, True),
    (100, 256, 1e-4, True),     # V < chunk
    (1000, 256, 1e-4, False),   # (D, V) layout
    (1024, 128, 0.1, False),    # V a multiple of chunk, large z-loss
])
def test_matches_reference_fp32(v, chunk, z_loss, transpose):
  hidden, embedding, targets, weights = _inputs(48, 32, v, transpose=transpose)
  args = (hidden, embedding, weights, targets)
  kw = dict(z_loss=z_loss, transpose=transpose)
  got = _objective(functools.partial(chunked_cross_entropy, chunk=chunk), **kw)(*args)
  want = _objective(_reference, **kw)(*args)
  _assert_close(got, want, 1e-5, 1e-5)
  assert (float(got[0][1][1]) == 0.0) == (z_loss == 0.0)  # z_sum


def _assert_grads_close(grads, ref_grads):
  """Low-precision gradients: 2% of each entry or of the largest entry."""
  for g, r in zip(grads, ref_grads):
    assert g.dtype == r.dtype
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    np.testing.assert_allclose(g, r, rtol=2e-2, atol=2e-2 * np.abs(r).max())


def test_bf16_matches_bf16_reference():
  hidden, embedding, targets, weights = _inputs(64, 64, 1000, dtype=jnp.bfloat16)
  args = (hidden, embedding, weights, targets)
  (_, sums), grads = _objective(functools.partial(chunked_cross_entropy, chunk=256), z_loss=1e-4)(*args)
  (_, ref_sums), ref_grads = _objective(_reference, z_loss=1e-4)(*args)
  _assert_close(sums, ref_sums, 1e-5, 1e-5)  # same bf16 products, fp32 everywhere after
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  _assert_grads_close(grads[:2], ref_grads[:2])
  _assert_close(grads[2], ref_grads[2], 1e-4, 1e-4)


def test_bf16_hidden_fp32_embedding():
  hidden, embedding, targets, weights = _inputs(32, 32, 500)
  args = (hidden.astype(jnp.bfloat16), embedding, weights, targets)
  (_, sums), grads = _objective(functools.partial(chunked_cross_entropy, chunk=128))(*args)
  (_, ref_sums), ref_grads = _objective(_reference)(*args)
  _assert_close(sums, ref_sums, 1e-5, 1e-5)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
  _assert_grads_close(grads[:2], ref_grads[:2])


def test_sharded_batched_inputs():
  """(B, T, D) hidden sharded on batch, (V, D) embedding sharded on vocab; leading axes flattened."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'model'))
  hidden, embedding, targets, weights = _inputs(64, 32, 1000)
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  args = (put(hidden.reshape(8, 8, 32), 'data', None, None), put(embedding, 'model', None),
          put(weights.reshape(8, 8), 'data', None), put(targets.reshape(8, 8), 'data', None))
  (obj, sums), grads = _objective(functools.partial(chunked_cross_entropy, chunk=256), z_loss=1e-4)(*args)
  (ref_obj, ref_sums), ref_grads = _objective(_reference, z_loss=1e-4)(hidden, embedding, weights, targets)
  _assert_close((obj, sums), (ref_obj, ref_sums), 1e-5, 1e-5)
  _assert_close([g.reshape(r.shape) for g, r in zip(grads, ref_grads)], ref_grads, 1e-5, 1e-5)


def test_full_logits_never_materialised():
  n, d, v = 256, 32, 8192
  hidden, embedding, targets, weights = _inputs(n, d, v)
  args = (hidden, embedding, weights, targets)
  chunked = _objective(functools.partial(chunked_cross_entropy, chunk=1024), z_loss=1e-4)
  reference = _objective(_reference, z_loss=1e-4)
  hlo = chunked.lower(*args).compile().as_text()
  ref_hlo = reference.lower(*args).compile().as_text()
  assert f'f32[{n},{v}]' in ref_hlo  # the check can fail
  assert f'[{n},{v}]' not in hlo and f'[{v},{n}]' not in hlo
  assert f'f32[{n},1024]' in hlo


@pytest.mark.parametrize('scale, cap, transpose', [(1.0, 4.0, True), (0.7, 2.5, False), (1.3, None, True)])
def test_logit_transform_matches_the_transformed_full_logits(scale, cap, transpose):
  """A final soft-cap and scale (LogitSpec) inside the chunks equal them applied to the full logits,
  values and gradients (hand-written backward against autodiff)."""
  from fmjax.model.logits import LogitSpec
  hidden, embedding, targets, weights = _inputs(40, 32, 700, transpose=transpose, seed=3)
  args = (hidden, embedding, weights, targets)

  def reference(hidden, embedding, targets, weights, z_loss=0.0, transpose=True):
    logits = jnp.dot(hidden, embedding.T if transpose else embedding, preferred_element_type=jnp.float32) * scale
    if cap is not None:
      logits = cap * jnp.tanh(logits / cap)
    return cross_entropy(logits, targets, weights, z_loss)

  kw = dict(z_loss=1e-3, transpose=transpose)
  spec = LogitSpec(scale=scale, softcap=cap)
  got = _objective(functools.partial(chunked_cross_entropy, chunk=256, logit_spec=spec), **kw)(*args)
  want = _objective(reference, **kw)(*args)
  _assert_close(got, want, 1e-5, 1e-5)
  plain = _objective(_reference, **kw)(*args)
  assert abs(float(want[0][0]) - float(plain[0][0])) > 1e-2 * abs(float(plain[0][0]))   # the transform bites
