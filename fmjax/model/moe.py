"""Mixture-of-experts feed-forward block: a linear router, top-k experts, SwiGLU experts, expert parallelism.

    logits = x W_router (fp32)            (tokens, E)
    p = softmax(logits); (w, e) = top_k(p, k); w /= sum(w) when model.moe_renormalize (Mixtral,
        Qwen3-MoE norm_topk_prob; OLMoE keeps the raw probabilities)
    y = sum_j w_j Expert_{e_j}(x) (+ SharedExpert(x) when model.moe_shared_mlp_dim > 0)

Parameters (per MoE layer, under `moe`): `router` (embed, E), `wi_0` and `wi_1` (E, embed, mlp) and `wo`
(E, mlp, embed), the expert axis logical 'exp' (mapped to the `expert` mesh axis by logical_axis_rules).

Dispatch (model.moe_capacity_factor):
- 0, dropless (default): each shard's token copies are sorted by expert and multiplied with grouped
  matmuls (model.moe_kernel: `jax.lax.ragged_dot`, the megablox GMM Pallas kernel on TPU, or 'blocked':
  row blocks of one expert each as one batched matmul, CPU's fastest), so no token is ever dropped.
  Under a mesh this runs in `shard_map`: tokens stay on their batch shard; with an expert axis each
  expert shard gathers the tokens of its expert group, computes its own experts and the partial
  outputs are reduce-scattered back (one all-gather and one reduce-scatter of activations per layer,
  computed one source shard's tokens at a time so the buffers stay one shard's size; the expert
  weights are never gathered across the expert axis).
- > 0, capacity: each batch row gives every expert C = ceil(factor * T * k / E) slots (tokens in order,
  a token's choices together); assignments past C are dropped (counted) and the block is dense
  dispatch / combine einsums that GSPMD shards.

Padding (segment id 0) is routed to no expert. Each layer sows, in the 'moe' collection, its
load-balancing loss (Switch / Mixtral form), router z-loss, per-expert load, router entropy, dropped
assignments (share) and the largest router logit; fmjax/objectives/moe_terms.py turns them into losses
and metrics.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import PartitionSpec as P

from fmjax.model.layers import MLP, dtype_of, param_with_axes

KERNELS = ('auto', 'ragged_dot', 'megablox', 'blocked')


def is_moe(cfg) -> bool:
  """True when the model has mixture-of-experts layers."""
  return int(cfg.get('num_experts', 0) or 0) > 0


def is_moe_layer(cfg, layer: int) -> bool:
  """Layer `layer` (0-based) is an MoE layer: past the first moe_first_dense, every moe_every-th."""
  if not is_moe(cfg) or layer < int(cfg.get('moe_first_dense', 0)):
    return False
  return (layer + 1) % int(cfg.get('moe_every', 1)) == 0


def moe_layers(cfg) -> list[int]:
  """The indices of the MoE layers."""
  return [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]


def expert_dim(cfg) -> int:
  """Each expert's hidden width (model.moe_mlp_dim, 0 = mlp_dim)."""
  return int(cfg.get('moe_mlp_dim', 0) or cfg.mlp_dim)


def route(logits, k: int, renormalize: bool, mask):
  """(weights, experts) of the top-k: fp32 softmax probabilities of the chosen experts (renormalised to
  sum 1 when `renormalize`), zero for masked-out (padding) tokens. Ties go to the lower expert index."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top_p, top_e = jax.lax.top_k(probs, k)
  if renormalize:
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  return top_p * mask[..., None].astype(top_p.dtype), top_e, probs


def router_stats(logits, probs, experts, mask, num_experts: int) -> dict:
  """Per-layer routing statistics over the real (mask) tokens: the load-balancing loss
  E * sum_e f_e P_e (f_e: share of tokens choosing e among their top-k, P_e: mean probability, as
  transformers' load_balancing_loss_func), the router z-loss mean(logsumexp(logits)^2), the share of
  assignments per expert (sums to 1), the mean router entropy and the largest |logit|."""
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  chosen = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=-2)   # (..., E) 0/1
  f = jnp.sum(chosen * m[..., None], axis=tuple(range(chosen.ndim - 1))) / n           # (E,) sums to k
  p_mean = jnp.sum(probs * m[..., None], axis=tuple(range(probs.ndim - 1))) / n        # (E,)
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return {
      'aux_loss': num_experts * jnp.sum(f * p_mean),
      'z_loss': jnp.sum(jnp.square(lse) * m) / n,
      'load': f / jnp.maximum(jnp.sum(f), 1e-30),
      'entropy': jnp.sum(entropy * m) / n,
      'logit_max': jnp.max(jnp.abs(logits)),
  }


def _blocked(x, w, sizes, block: int = 128):
  """Grouped matmul as a batched matmul over row blocks of one group each: every group's rows padded to a
  multiple of `block`, each block multiplied by its group's matrix (gathered per block). Costs the real rows
  plus at most one block per group, where ragged_dot's CPU lowering multiplies every row by every group."""
  m, g = x.shape[0], w.shape[0]
  block = max(8, min(block, m))
  blocks = -(-m // block) + g                                  # static bound on the padded blocks
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  padded = -(-sizes // block) * block
  padded_starts = jnp.cumsum(padded) - padded
  row = jnp.arange(m)
  group = jnp.minimum(jnp.searchsorted(ends, row, side='right'), g - 1)
  live = row < ends[-1]
  dest = jnp.where(live, padded_starts[group] + row - starts[group], blocks * block)   # rows past the groups: out
  xp = jnp.zeros((blocks * block, x.shape[1]), x.dtype).at[dest].set(x, mode='drop')
  block_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(blocks) * block, side='right'), g - 1)
  yp = jnp.einsum('bik,bkn->bin', xp.reshape(blocks, block, -1), w.astype(x.dtype)[block_group],
                  preferred_element_type=x.dtype)
  return jnp.where(live[:, None], yp.reshape(blocks * block, -1)[jnp.minimum(dest, blocks * block - 1)], 0)


def _grouped(x, w, sizes, kernel: str):
  """Grouped matmul: rows of `x` (sorted by group) times their group's matrix of `w` (G, K, N); rows past
  sum(sizes) give 0. Accumulates in fp32 (as the kernels do), result in x's dtype."""
  if kernel.startswith('megablox'):
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=import-outside-toplevel
    m = x.shape[0]
    tile = min(128, m) if m % 8 == 0 else m
    pad = (-m) % tile
    # gmm leaves rows past sum(sizes) unwritten (forward and input gradient): mask them both ways
    valid = (jnp.arange(m + pad) < jnp.sum(sizes))[:, None]
    xp = jnp.where(valid, jnp.pad(x, ((0, pad), (0, 0))) if pad else x, 0)
    tiling = (tile, min(128, w.shape[1]), min(128, w.shape[2]))
    out = gmm(xp, w.astype(x.dtype), sizes.astype(jnp.int32), preferred_element_type=x.dtype, tiling=tiling,
              interpret=kernel == 'megablox_interpret')
    return jnp.where(valid, out, 0)[:m].astype(x.dtype)
  if kernel == 'blocked':
    return _blocked(x, w, sizes)
  return jax.lax.ragged_dot(x, w.astype(x.dtype), sizes.astype(jnp.int32), preferred_element_type=x.dtype)


def expert_outputs(x, experts, weights, wi_0, wi_1, wo, first_expert, kernel: str = 'ragged_dot',
                   activation=nn.silu):
  """Dropless expert computation of one shard: x (n, D), experts / weights (n, k) -> (n, D), the sum over
  each token's chosen experts that live here (experts first_expert .. first_expert + wi_0.shape[0] - 1)."""
  n, k = experts.shape
  local_count = wi_0.shape[0]
  flat = experts.reshape(-1) - first_expert
  here = (flat >= 0) & (flat < local_count)
  group = jnp.where(here, flat, local_count)                    # elsewhere -> a last group, never computed
  order = jnp.argsort(group, stable=True)
  sizes = jnp.bincount(group, length=local_count + 1)[:local_count]
  token = order // k
  rows = x[token]                                               # (n k, D), sorted by expert
  wi = jnp.concatenate([wi_0, wi_1], axis=-1)                   # (E_here, D, 2F): one grouped matmul
  h = _grouped(rows, wi, sizes, kernel)
  gate, up = jnp.split(h, 2, axis=-1)
  y = _grouped(activation(gate) * up, wo, sizes, kernel)        # (n k, D)
  scale = jnp.where(here, weights.reshape(-1), 0.0)[order]
  y = y.astype(jnp.float32) * scale[:, None]
  return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(y).astype(x.dtype)


def capacity_outputs(x, experts, weights, wi_0, wi_1, wo, capacity_factor: float, activation=nn.silu):
  """Capacity-limited experts as dense dispatch / combine einsums, per batch row: x (B, T, D), experts and
  weights (B, T, k). Returns (outputs (B, T, D), the share of real tokens' assignments dropped)."""
  b, t, k = experts.shape
  e = wi_0.shape[0]
  capacity = max(1, math.ceil(capacity_factor * t * k / e))
  live = (weights > 0).astype(jnp.int32)                        # padding takes no slot
  choice = jax.nn.one_hot(experts, e, dtype=jnp.int32) * live[..., None]      # (B, T, k, E)
  flat = choice.reshape(b, t * k, e)
  slot = (jnp.cumsum(flat, axis=1) - 1).reshape(b, t, k, e)    # position in its expert, tokens in order
  kept = choice * (slot < capacity)
  dropped = (jnp.sum(choice) - jnp.sum(kept)) / jnp.maximum(jnp.sum(choice), 1)   # share of real assignments
  place = jax.nn.one_hot(jnp.where(kept > 0, slot, -1), capacity, dtype=x.dtype)   # (B, T, k, E, C)
  dispatch = jnp.sum(place, axis=2)                                                   # (B, T, E, C)
  combine = jnp.einsum('btkec,btk->btec', place, weights.astype(x.dtype))
  inputs = jnp.einsum('btec,btd->becd', dispatch, x)
  gate = jnp.einsum('becd,edf->becf', inputs, wi_0.astype(x.dtype))
  up = jnp.einsum('becd,edf->becf', inputs, wi_1.astype(x.dtype))
  out = jnp.einsum('becf,efd->becd', activation(gate) * up, wo.astype(x.dtype))
  return jnp.einsum('btec,becd->btd', combine, out), dropped


def _mesh_axes(logical: str, rules) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to (a tuple, possibly empty)."""
  spec = nn.logical_to_mesh_axes((logical,), rules)[0]
  if spec is None:
    return ()
  return (spec,) if isinstance(spec, str) else tuple(spec)


def _sharded_dropless(x, experts, weights, wi_0, wi_1, wo, kernel: str, activation):
  """`expert_outputs` over the active mesh in shard_map (see the module docstring); x (B, T, D)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  batch = tuple(a for a in _mesh_axes('batch', rules) if mesh.shape.get(a, 1) > 1)
  expert = tuple(a for a in _mesh_axes('exp', rules) if mesh.shape.get(a, 1) > 1)
  hidden = tuple(a for a in _mesh_axes('mlp', rules) if mesh.shape.get(a, 1) > 1)
  shards = math.prod(mesh.shape[a] for a in batch)
  if x.shape[0] % shards:          # e.g. one row decoding on a data-parallel mesh: GSPMD, unsharded tokens
    batch = ()
  gathered = tuple(a for a in batch if a in expert)
  local_experts = wi_0.shape[0] // math.prod(mesh.shape[a] for a in expert)
  row = P(batch or None, None, None)

  def local(x, experts, weights, wi_0, wi_1, wo):
    b, t, d = x.shape
    k = experts.shape[-1]
    x, experts, weights = x.reshape(b * t, d), experts.reshape(b * t, k), weights.reshape(b * t, k)
    first = jax.lax.axis_index(expert) * local_experts if expert else 0
    compute = lambda x, experts, weights: expert_outputs(x, experts, weights, wi_0, wi_1, wo, first, kernel,
                                                         activation)
    if gathered:   # each source shard's tokens in turn: buffers of one shard's rows, not the group's
      parts = [jax.lax.all_gather(a, gathered, axis=0) for a in (x, experts, weights)]   # (shards, n, ...)
      y = jax.lax.map(lambda p: jax.checkpoint(compute)(*p), parts)
    else:
      y = compute(x, experts, weights)
    if hidden:
      y = jax.lax.psum(y, hidden)
    if gathered:
      y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0)
    rest = tuple(a for a in expert if a not in gathered)
    if rest:
      y = jax.lax.psum(y, rest)
    return y.reshape(b, t, d)

  e_spec, h_spec = expert or None, hidden or None
  # The megablox pallas_call carries no varying-axes types, so its shard_map runs unchecked; the collectives
  # above are the same either way (tests/parallel/test_moe_mesh.py checks both kernels' gradients).
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(row, row, row, P(e_spec, None, h_spec), P(e_spec, None, h_spec),
                                 P(e_spec, h_spec, None)),
                       out_specs=row, check_vma=not kernel.startswith('megablox'))(x, experts, weights, wi_0, wi_1, wo)


def target_platform(cfg) -> str:
  """The platform the model is built for: the run's (attention_select.for_run records it, e.g. a TPU
  topology compiled from a CPU host), else JAX's default backend."""
  return cfg.get('attention_platform', None) or jax.default_backend()


def resolve_kernel(cfg) -> str:
  """model.moe_kernel with 'auto' resolved: megablox on TPU, blocked on CPU (measured 2.4x ragged_dot's
  step on configs/moe_default.py), ragged_dot on GPU. megablox off TPU runs the Pallas kernel interpreted
  (tests)."""
  kernel = cfg.get('moe_kernel', 'auto')
  if kernel != 'auto':
    return kernel if kernel != 'megablox' or target_platform(cfg) == 'tpu' else 'megablox_interpret'
  return {'tpu': 'megablox', 'cpu': 'blocked'}.get(target_platform(cfg), 'ragged_dot')


class MoE(nn.Module):
  """The mixture-of-experts MLP of one layer (see the module docstring). x: (B, T, D); mask: (B, T), True
  for real tokens."""
  cfg: Any

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.cfg
    e, k, f, d = int(cfg.num_experts), int(cfg.num_experts_per_tok), expert_dim(cfg), cfg.d_model
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    normal = nn.initializers.normal
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    router = param_with_axes(self, 'router', normal(cfg.init_std), (d, e), ('embed', None), pdtype)
    wi_0 = param_with_axes(self, 'wi_0', normal(cfg.init_std), (e, d, f), ('exp', 'embed', 'mlp'), pdtype)
    wi_1 = param_with_axes(self, 'wi_1', normal(cfg.init_std), (e, d, f), ('exp', 'embed', 'mlp'), pdtype)
    wo = param_with_axes(self, 'wo', normal(out_std), (e, f, d), ('exp', 'mlp', 'embed'), pdtype)
    logits = jnp.einsum('btd,de->bte', x.astype(jnp.float32), router.astype(jnp.float32))
    logits = nn.with_logical_constraint(logits, ('batch', 'activation_length', None))
    weights, experts, probs = route(logits, k, bool(cfg.get('moe_renormalize', True)), mask)
    stats = router_stats(logits, probs, experts, mask, e)
    x = x.astype(dtype)
    factor = float(cfg.get('moe_capacity_factor', 0.0) or 0.0)
    if factor > 0:
      y, dropped = capacity_outputs(x, experts, weights, wi_0, wi_1, wo, factor)
    else:
      kernel = resolve_kernel(cfg)
      mesh = jax.sharding.get_abstract_mesh()
      if mesh.empty or mesh.size == 1:
        b, t, _ = x.shape
        y = expert_outputs(x.reshape(b * t, d), experts.reshape(b * t, k), weights.reshape(b * t, k), wi_0, wi_1,
                           wo, 0, kernel).reshape(b, t, d)
      else:
        y = _sharded_dropless(x, experts, weights, wi_0, wi_1, wo, kernel, nn.silu)
      dropped = jnp.zeros((), jnp.float32)
    for name, value in dict(stats, dropped=dropped.astype(jnp.float32)).items():
      self.sow('moe', name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)   # one value per layer
    if int(cfg.get('moe_shared_mlp_dim', 0) or 0):
      y = y + MLP(cfg, int(cfg.moe_shared_mlp_dim), name='shared')(x)
    return nn.with_logical_constraint(y, ('batch', 'activation_length', 'activation_embed'))
