"""The language-model objective: token-summed cross-entropy (+ z-loss) of next-token (or masked-token) targets.

`lm_loss_fn(model, z_loss, vocab_chunk)` is the loss the train step differentiates. With
`vocab_chunk` > 0 the output projection and the loss are fused over vocab chunks
(fmjax/objectives/chunked_ce.py) and the (tokens, vocab) fp32 logits never exist; either way the
logits are the model's one head (fmjax/model/logits.py), its logit transform included. An
encoder's MLM targets are the masked positions (fmjax/objectives/mlm.py): the same loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from fmjax.model import logits as logits_lib
from fmjax.objectives import moe_terms
from fmjax.objectives.chunked_ce import chunked_cross_entropy


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """Token-summed cross-entropy and z-loss (fp32). Returns (ce_sum, z_sum, weight_sum)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - target_logit) * weights
  z = z_loss * jnp.square(log_z) * weights
  return ce.sum(), z.sum(), weights.sum()


def lm_loss_fn(model: nn.Module, z_loss: float, vocab_chunk: int = 0) -> Callable:
  """`loss(params, batch, rng) -> (objective_sum, (ce_sum, weight_sum))` for next-token prediction; an MoE
  model adds its load-balancing and router z-losses and returns (ce_sum, weight_sum, extras), its routing
  metrics (fmjax/objectives/moe_terms.py)."""
  spec = logits_lib.logit_spec(model.cfg)

  def loss(params, batch, rng):
    deterministic = rng is None
    out, stats = moe_terms.apply(model, params, batch['inputs'], batch['positions'], batch['segment_ids'],
                                 deterministic=deterministic, rngs=None if deterministic else {'dropout': rng},
                                 head=not vocab_chunk)
    if vocab_chunk:
      hidden, matrix, transposed = out
      ce, z, w = chunked_cross_entropy(hidden, matrix.astype(hidden.dtype), batch['targets'], batch['weights'],
                                       z_loss, vocab_chunk, transposed, logit_spec=spec)
    else:
      ce, z, w = cross_entropy(out, batch['targets'], batch['weights'], z_loss)
    if stats is None:
      return ce + z, (ce, w)
    moe_add, extras = moe_terms.terms(model.cfg, stats, w)
    return ce + z + moe_add, (ce, w, extras)
  return loss
