"""The train step and the eval step: one builder used by train and finetune (the LM loss is
fmjax/objectives/lm.py; a fine-tuning task brings its own).

Batch format (global arrays, sharded on the batch axis):
  inputs, targets, segment_ids, positions: int32 (B, T); weights: float32 (B, T)
Losses are token sums divided by the total weight of the whole (global) batch, so a batch
split into microbatches gives the same gradient as the batch taken at once. A loss returns
`(objective_sum, (loss_sum, weight_sum))`, or `(objective_sum, (loss_sum, weight_sum, extras))` where
`extras` are further sums (e.g. DPO's rewards) reported as metrics divided by the same weight.
A task may add float32 (B, T) batch keys (`extra_keys`, e.g. DPO's reference log-probabilities).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from fmjax.training import numerics
from fmjax.data.batches import BATCH_KEYS  # noqa: F401  (re-exported: the batch format)
from fmjax.objectives.lm import cross_entropy, lm_loss_fn  # noqa: F401  (re-exported: the LM objective)
from fmjax.training.state import TrainState


def _split_microbatches(batch, n: int):
  """(B, ...) -> (n, B/n, ...), microbatch m taking rows m, m+n, ... (keeps each device's rows local)."""
  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _with_extras(loss_fn):
  """`loss_fn` with its aux always (loss_sum, weight_sum, extras dict)."""
  def loss(params, batch, rng):
    obj, aux = loss_fn(params, batch, rng)
    return obj, (aux[0], aux[1], aux[2] if len(aux) > 2 else {})
  return loss


def accumulate_gradients(loss_fn, params, batch, rng, microbatches: int):
  """Sum of loss and gradients over microbatches (lax.scan), then normalised by total weight.
  Returns (grads, objective, loss, weight, extras), extras (the loss's further sums) normalised too."""
  loss_fn = _with_extras(loss_fn)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (obj, (ce, w, extras)), grads = grad_fn(params, batch, rng)
  else:
    micro = _split_microbatches(batch, microbatches)

    def body(carry, xs):
      i, mb = xs
      mb = jax.tree.map(lambda x: nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1)), mb)
      sub = None if rng is None else jax.random.fold_in(rng, i)
      (o, (c, ww, ex)), g = grad_fn(params, mb, sub)
      acc_g, acc_o, acc_c, acc_w, acc_ex = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_o + o, acc_c + c, acc_w + ww,
              jax.tree.map(jnp.add, acc_ex, ex)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    first = jax.tree.map(lambda x: x[0], micro)
    extra_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               jax.eval_shape(lambda: loss_fn(params, first, rng)[1][2]))
    (grads, obj, ce, w, extras), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, 0.0, extra_zeros),
                                                  (jnp.arange(microbatches), micro))
  denom = jnp.maximum(w, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  return grads, obj / denom, ce / denom, w, {k: v / denom for k, v in extras.items()}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable,
                    microbatches: int = 1, dropout: bool = False, seed: int = 0,
                    skip_nonfinite: bool = False, prepare: Callable | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Build `step(state, batch) -> (state, metrics)`; jit it with shardings and donation.

  `prepare(batch, step) -> batch`, if given, turns the pipeline's batch into the objective's
  inside the step (the encoder's masking, fmjax/objectives/mlm.py), as a pure function of the step number.

  Metrics include `nonfinite` (1.0 when the loss or the gradient norm is nan/inf); with
  `skip_nonfinite` such a step leaves parameters and optimizer state unchanged (the step
  counter still advances, so the data and the step numbers stay aligned).
  """
  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step) if dropout else None
    if prepare is not None:
      batch = prepare(batch, state.step)
    grads, objective, ce, weight, extras = accumulate_gradients(loss_fn, state.params, batch, rng, microbatches)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    nonfinite = numerics.nonfinite_flag(ce, objective, grad_norm, *numerics.guarded_extras(extras))
    if skip_nonfinite:
      keep = nonfinite > 0
      params, opt_state = jax.tree.map(lambda old, new: jnp.where(keep, old, new),
                                       (state.params, state.opt_state), (params, opt_state))
    metrics = {
        'loss': ce,
        'objective': objective,
        'grad_norm': grad_norm,
        'learning_rate': schedule(state.step),
        'tokens': weight,
        'nonfinite': nonfinite,
        **extras,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return step


def make_eval_step(model: nn.Module, token_bytes: jax.Array | None = None,
                   prepare: Callable | None = None) -> Callable[[Any, dict], dict]:
  """Build `eval(params, batch) -> {'loss_sum', 'weight', 'bytes'}` (sums; combine across batches).

  With `prepare` (the encoder's masking, called with step None) it also sums 'correct': masked
  tokens predicted right, so correct / weight is the masked-token accuracy.
  """
  def evaluate(params, batch):
    if prepare is not None:
      batch = prepare(batch, None)
    logits = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    ce, _, w = cross_entropy(logits, batch['targets'], batch['weights'])
    out = {'loss_sum': ce, 'weight': w}
    if prepare is not None:
      out['correct'] = ((jnp.argmax(logits, -1) == batch['targets']) * batch['weights']).sum()
    if token_bytes is not None:
      out['bytes'] = (token_bytes[batch['targets']] * batch['weights']).sum()
    return out
  return evaluate


def jit_train_step(step: Callable, state_shardings, batch_sharding, replicated, extra_keys=()) -> Callable:
  """jit with explicit in/out shardings; the incoming state is donated."""
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS + tuple(extra_keys)}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))

