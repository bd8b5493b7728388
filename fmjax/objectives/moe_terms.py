"""The mixture-of-experts terms of a loss: load-balancing loss, router z-loss and routing metrics.

Each MoE layer sows its statistics in the 'moe' collection (fmjax/model/moe.py). `apply` runs the model
with that collection mutable and returns them stacked per layer; `terms` turns them into what the train
step adds: the weighted losses (averaged over the MoE layers) and metrics, all as sums over the batch's
token weight like every other loss term (fmjax/training/step.py divides by the global weight).

Metrics: moe_aux_loss, moe_z_loss (unweighted, averaged over layers), moe_load_max / moe_load_min (the
largest / smallest share of routed assignments any expert gets in any layer; balanced = 1 / num_experts),
moe_entropy (mean router entropy, nats), moe_dropped (share of assignments dropped by capacity),
moe_router_logit_max (the numerics guard checks it), and per layer `layers/{i}/moe_load_max`,
`layers/{i}/moe_load_min`, `layers/{i}/moe_entropy` (TensorBoard only).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from fmjax.model.moe import is_moe, moe_layers

LAYER_PREFIX = 'layers/'   # per-layer metrics: written to TensorBoard and metrics.jsonl, not the console


def apply(model, params, *args, **kwargs):
  """`model.apply({'params': params}, ...)` -> (output, per-layer MoE statistics or None for a dense model)."""
  if not is_moe(model.cfg):
    return model.apply({'params': params}, *args, **kwargs), None
  out, state = model.apply({'params': params}, *args, mutable=['moe'], **kwargs)
  return out, stacked(state['moe'], model.cfg)


def stacked(collection, cfg) -> dict:
  """{stat: (L, ...)} over the MoE layers, in layer order, from a scanned ('layers') or unrolled
  ('layers_i') 'moe' collection."""
  if 'layers' in collection:
    return dict(collection['layers']['moe'])
  def index(name):
    return int(re.fullmatch(r'layers_(\d+)', name).group(1))
  names = sorted(collection, key=index)
  stats = [collection[n]['moe'] for n in names]
  return {k: jnp.stack([s[k] for s in stats]) for k in stats[0]}


def terms(cfg, stats: dict | None, weight) -> tuple[jax.Array, dict]:
  """(objective addition, metric sums) of the statistics for a batch of token weight `weight`."""
  if stats is None:
    return jnp.zeros((), jnp.float32), {}
  aux, z = jnp.mean(stats['aux_loss']), jnp.mean(stats['z_loss'])
  add = (cfg.moe_aux_loss * aux + cfg.moe_router_z_loss * z) * weight
  metrics = {
      'moe_aux_loss': aux, 'moe_z_loss': z, 'moe_load_max': jnp.max(stats['load']),
      'moe_load_min': jnp.min(stats['load']), 'moe_entropy': jnp.mean(stats['entropy']),
      'moe_router_logit_max': jnp.max(stats['logit_max']),
  }
  if cfg.get('moe_capacity_factor', 0.0):
    metrics['moe_dropped'] = jnp.mean(stats['dropped'])
  for j, layer in enumerate(moe_layers(cfg)):
    metrics[f'{LAYER_PREFIX}{layer}/moe_load_max'] = jnp.max(stats['load'][j])
    metrics[f'{LAYER_PREFIX}{layer}/moe_load_min'] = jnp.min(stats['load'][j])
    metrics[f'{LAYER_PREFIX}{layer}/moe_entropy'] = stats['entropy'][j]
  return add, {name: value * weight for name, value in metrics.items()}
