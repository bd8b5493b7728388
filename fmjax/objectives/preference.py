"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023).

A DPO batch of B rows holds B/2 pairs: rows [0, B/2) are the chosen responses and rows [B/2, B)
the rejected ones, pair i at rows i and B/2 + i (a layout that microbatching, which takes rows
m, m+n, ..., keeps whole when n divides B/2). `weights` mark the response tokens (as targets) and
`reference_logps` holds the frozen reference model's log-probability of each target token,
computed once from the starting parameters (fmjax/finetune/reference.py).

With h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), sums over
the response tokens:
  sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing, cDPO)
  ipo      (h' - 1 / (2 beta))^2, h' the same difference of per-token mean log-probabilities (as TRL)
Metrics (TRL's names): rewards/chosen = beta (log pi(chosen) - log ref(chosen)), rewards/rejected
likewise, rewards/margins their difference, rewards/accuracies the share of pairs whose margin is > 0.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

LOSSES = ('sigmoid', 'ipo')
REFERENCE_KEY = 'reference_logps'
METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies')   # TRL's names


def token_logps(logits, targets):
  """log-probability (fp32) of each target token: (B, T, V), (B, T) -> (B, T)."""
  logits = logits.astype(jnp.float32)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0,
              loss: str = 'sigmoid', n_chosen=None, n_rejected=None) -> dict:
  """Per-pair loss and rewards from per-sequence log-probability sums (P,); `n_*`: response tokens per
  sequence (IPO's per-token means). Returns {'loss', 'rewards_chosen', 'rewards_rejected'} each (P,)."""
  chosen = policy_chosen - ref_chosen
  rejected = policy_rejected - ref_rejected
  if loss == 'sigmoid':
    h = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
  elif loss == 'ipo':
    h = chosen / jnp.maximum(n_chosen, 1.0) - rejected / jnp.maximum(n_rejected, 1.0)
    losses = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f'unknown DPO loss {loss!r}; one of {", ".join(LOSSES)}')
  return {'loss': losses, 'rewards_chosen': beta * chosen, 'rewards_rejected': beta * rejected}


def pair_sums(logps, batch) -> dict:
  """Per-pair sums of a (B, T) token log-probability array and of the reference's, split into the
  chosen half and the rejected half: {'policy_*', 'ref_*', 'n_*', 'valid'} each (B/2,)."""
  w = batch['weights']
  # The (B,) sums, replicated before the halves are paired: one small all-gather instead of a permute
  # between batch shards (which stalled XLA's CPU collectives on an 8-device mesh in the tests).
  whole = lambda x: nn.with_logical_constraint(x, (None,))
  policy = whole((logps * w).sum(-1))
  ref = whole((batch[REFERENCE_KEY] * w).sum(-1))
  n = whole(w.sum(-1))
  half = w.shape[0] // 2
  return {'policy_chosen': policy[:half], 'policy_rejected': policy[half:], 'ref_chosen': ref[:half],
          'ref_rejected': ref[half:], 'n_chosen': n[:half], 'n_rejected': n[half:],
          'valid': ((n[:half] > 0) & (n[half:] > 0)).astype(jnp.float32)}


def pair_metrics(logps, batch, beta: float, label_smoothing: float, loss: str) -> tuple:
  """(loss sum, pair count, metric sums) over the real pairs of a batch."""
  s = pair_sums(logps, batch)
  t = dpo_terms(s['policy_chosen'], s['policy_rejected'], s['ref_chosen'], s['ref_rejected'], beta,
                label_smoothing, loss, s['n_chosen'], s['n_rejected'])
  valid = s['valid']
  margins = t['rewards_chosen'] - t['rewards_rejected']
  sums = {'rewards/chosen': (t['rewards_chosen'] * valid).sum(), 'rewards/rejected': (t['rewards_rejected'] * valid).sum(),
          'rewards/margins': (margins * valid).sum(), 'rewards/accuracies': ((margins > 0) * valid).sum()}
  return (t['loss'] * valid).sum(), valid.sum(), sums


def dpo_loss_fn(model: nn.Module, beta: float, label_smoothing: float = 0.0, loss: str = 'sigmoid') -> Callable:
  """`loss(params, batch, rng) -> (loss_sum, (loss_sum, pairs, metric sums))` for the train step, which
  divides by the pairs of the whole batch."""
  def fn(params, batch, rng):
    deterministic = rng is None
    logits = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                         deterministic=deterministic, rngs=None if deterministic else {'dropout': rng})
    total, pairs, sums = pair_metrics(token_logps(logits, batch['targets']), batch, beta, label_smoothing, loss)
    return total, (total, pairs, sums)
  return fn


def eval_fn(model: nn.Module, beta: float, label_smoothing: float = 0.0, loss: str = 'sigmoid') -> Callable:
  """`evaluate(params, batch) -> {'loss_sum', 'pairs', metric sums}` over a batch of held-out pairs."""
  def fn(params, batch):
    logits = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    total, pairs, sums = pair_metrics(token_logps(logits, batch['targets']), batch, beta, label_smoothing, loss)
    return {'loss_sum': total, 'pairs': pairs, **sums}
  return fn


def reference_fn(model: nn.Module) -> Callable:
  """`logps(params, batch) -> (B, T)` token log-probabilities of the targets, weighted (0 off the response)."""
  def fn(params, batch):
    logits = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    return token_logps(logits, batch['targets']) * batch['weights']
  return fn
