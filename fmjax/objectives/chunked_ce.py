"""Vocab-chunked fused cross-entropy: the output projection and the loss in one pass.

`chunked_cross_entropy(hidden, embedding, ...)` equals
`lm.cross_entropy(spec.apply(hidden @ embedding.T), ...)` (fmjax/objectives/lm.py; `spec` the
model's LogitSpec, fmjax/model/logits.py: identity unless the model scales or soft-caps its
logits) but loops over blocks of `chunk` vocabulary columns, forward and backward, so only an
(N, chunk) block of fp32 logits exists at a time instead of the full (N, V) logits and their
gradient. The forward keeps an online (running max, running sum) logsumexp per token; the
backward recomputes each logits block from the saved per-token logsumexp. The logits are
computed in hidden's dtype with fp32 accumulation; the transform is applied to them in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fmjax.model.logits import LogitSpec

_MASK = -1e30  # logit given to the padding columns past V


def _vocab_size(embedding, transpose: bool) -> int:
  return embedding.shape[0] if transpose else embedding.shape[1]


def _pad_vocab(embedding, transpose: bool, chunk: int):
  """Zero-pad the vocab axis of the projection up to a multiple of chunk."""
  pad = -_vocab_size(embedding, transpose) % chunk
  if not pad:
    return embedding
  widths = ((0, pad), (0, 0)) if transpose else ((0, 0), (0, pad))
  return jnp.pad(embedding, widths)


def _logits_block(hidden, embedding, start, chunk: int, vocab: int, transpose: bool, spec: LogitSpec):
  """fp32 logits (..., chunk) of hidden (..., D) for vocab columns [start, start + chunk), transformed by
  `spec`, padding columns masked; also the transform's slope there (None for the identity), 0 in padding
  columns, and the columns' ids (broadcastable against the logits)."""
  axis = 0 if transpose else 1
  w = jax.lax.dynamic_slice_in_dim(embedding, start, chunk, axis=axis).astype(hidden.dtype)
  last = hidden.ndim - 1
  dims = (((last,), (1,)), ((), ())) if transpose else (((last,), (0,)), ((), ()))
  logits = jax.lax.dot_general(hidden, w, dims, preferred_element_type=jnp.float32)
  cols = (start + jnp.arange(chunk)).reshape((1,) * last + (chunk,))
  real = cols < vocab
  slope = None
  if not spec.identity:
    logits = spec.apply(logits)
    slope = jnp.where(real, spec.slope(logits), 0.0)
  return jnp.where(real, logits, _MASK), w, cols, slope


def _forward(hidden, embedding, targets, chunk: int, transpose: bool, spec: LogitSpec):
  """Per-token (logsumexp, target logit), both fp32 (...,), by an online logsumexp over chunks."""
  vocab = _vocab_size(embedding, transpose)
  padded = _pad_vocab(embedding, transpose, chunk)
  n = hidden.shape[:-1]

  def body(carry, start):
    run_max, run_sum, target_logit = carry
    logits, _, cols, _ = _logits_block(hidden, padded, start, chunk, vocab, transpose, spec)
    new_max = jnp.maximum(run_max, logits.max(axis=-1))
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(axis=-1)
    target_logit += jnp.where(cols == targets[..., None], logits, 0.0).sum(axis=-1)
    return (new_max, run_sum, target_logit), None

  init = (jnp.full(n, -jnp.inf, jnp.float32), jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.float32))
  starts = jnp.arange(0, padded.shape[0 if transpose else 1], chunk)
  (run_max, run_sum, target_logit), _ = jax.lax.scan(body, init, starts)
  return run_max + jnp.log(run_sum), target_logit


def _sums(lse, target_logit, weights, z_loss: float):
  ce = (lse - target_logit) * weights
  z = z_loss * jnp.square(lse) * weights
  return ce.sum(), z.sum(), weights.sum()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(hidden, embedding, targets, weights, z_loss: float, chunk: int, transpose: bool, spec: LogitSpec):
  lse, target_logit = _forward(hidden, embedding, targets, chunk, transpose, spec)
  return _sums(lse, target_logit, weights, z_loss)


def _fused_fwd(hidden, embedding, targets, weights, z_loss, chunk, transpose, spec):
  lse, target_logit = _forward(hidden, embedding, targets, chunk, transpose, spec)
  residuals = (hidden, embedding, targets, weights, lse, target_logit)
  return _sums(lse, target_logit, weights, z_loss), residuals


def _fused_bwd(z_loss, chunk, transpose, spec, residuals, g):
  """Recompute each logits block; d logits = w * (p * (g_ce + 2 z_loss lse g_z) - g_ce * onehot),
  times the logit transform's slope when it is not the identity."""
  hidden, embedding, targets, weights, lse, target_logit = residuals
  g_ce, g_z, g_w = (x.astype(jnp.float32) for x in g)
  vocab = _vocab_size(embedding, transpose)
  padded = _pad_vocab(embedding, transpose, chunk)
  p_scale = (weights * (g_ce + 2.0 * z_loss * lse * g_z))[..., None]
  onehot_scale = (weights * g_ce)[..., None]
  lead = 'abcdefgh'[:hidden.ndim - 1]
  axis = 0 if transpose else 1

  def body(carry, start):
    d_hidden, d_embedding = carry
    logits, w, cols, slope = _logits_block(hidden, padded, start, chunk, vocab, transpose, spec)
    probs = jnp.exp(logits - lse[..., None])
    d_logits = p_scale * probs - jnp.where(cols == targets[..., None], onehot_scale, 0.0)
    if slope is not None:
      d_logits = d_logits * slope
    d_logits = d_logits.astype(hidden.dtype)
    mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    if transpose:  # logits = h @ w.T with w (chunk, D)
      d_hidden += mm(f'{lead}c,cd->{lead}d', d_logits, w)
      d_w = mm(f'{lead}c,{lead}d->cd', d_logits, hidden)
    else:  # logits = h @ w with w (D, chunk)
      d_hidden += mm(f'{lead}c,dc->{lead}d', d_logits, w)
      d_w = mm(f'{lead}d,{lead}c->dc', hidden, d_logits)
    d_embedding = jax.lax.dynamic_update_slice_in_dim(d_embedding, d_w.astype(d_embedding.dtype),
                                                      start, axis=axis)
    return (d_hidden, d_embedding), None

  init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(padded.shape, embedding.dtype))
  starts = jnp.arange(0, padded.shape[axis], chunk)
  (d_hidden, d_embedding), _ = jax.lax.scan(body, init, starts)
  d_embedding = jax.lax.slice_in_dim(d_embedding, 0, vocab, axis=axis)
  d_weights = g_ce * (lse - target_logit) + g_z * z_loss * jnp.square(lse) + g_w
  return d_hidden.astype(hidden.dtype), d_embedding, None, d_weights.astype(weights.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_cross_entropy(hidden, embedding, targets, weights, z_loss: float = 0.0, chunk: int = 4096,
                          transpose: bool = True, logit_spec: LogitSpec | None = None):
  """Token-summed cross-entropy and z-loss of `logit_spec.apply(hidden @ embedding.T)`, one vocab chunk at a time.

  hidden (N, D), any float dtype (leading batch axes are flattened, except when the mesh shards the
  sequence: flattening would lose that sharding, so (B, T, D) stays); embedding, the output
  projection, (V, D) if transpose else (D, V), cast to hidden's dtype chunk by chunk; targets
  (N,) int32; weights (N,) float32. Returns (ce_sum, z_sum, weight_sum) in fp32, exactly as
  `lm.cross_entropy(logits, targets, weights, z_loss)` for the fp32-accumulated logits, and
  is differentiable in hidden, embedding and weights without the (N, V) logits. Any V works:
  the vocab is padded to a multiple of chunk (chunk is capped at V).
  """
  from fmjax.model import context_parallel  # pylint: disable=import-outside-toplevel
  if context_parallel.context_size() == 1:   # one 2-D matmul per chunk (XLA CPU's fastest form)
    hidden = hidden.reshape(-1, hidden.shape[-1])
  targets = targets.reshape(hidden.shape[:-1]).astype(jnp.int32)
  weights = weights.reshape(hidden.shape[:-1]).astype(jnp.float32)
  chunk = max(1, min(int(chunk), _vocab_size(embedding, transpose)))
  return _fused(hidden, embedding, targets, weights, float(z_loss), chunk, bool(transpose), logit_spec or LogitSpec())
