"""The MoE block against a per-token NumPy reference: routing, experts, losses, dropless vs capacity."""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.config import schema
from fmjax.model import moe as moe_lib
from fmjax.objectives import moe_terms

E, K, D, F = 4, 2, 16, 24


def _cfg(**kw):
  cfg = schema.model_defaults()
  cfg.update(dict(d_model=D, num_layers=2, num_heads=2, mlp_dim=32, num_experts=E, num_experts_per_tok=K,
                  moe_mlp_dim=F, vocab_size=32), **kw)
  return cfg


def _params(seed=0, scale=0.3):
  r = np.random.default_rng(seed)
  return {'router': r.normal(0, 1.0, (D, E)).astype(np.float32),
          'wi_0': r.normal(0, scale, (E, D, F)).astype(np.float32),
          'wi_1': r.normal(0, scale, (E, D, F)).astype(np.float32),
          'wo': r.normal(0, scale, (E, F, D)).astype(np.float32)}


def _silu(a):
  return a / (1 + np.exp(-a))


def reference(x, p, k=K, renormalize=True, mask=None):
  """Per token, per chosen expert (float64): outputs, the aux loss, the z-loss and the per-expert load."""
  x = np.asarray(x, np.float64).reshape(-1, D)
  mask = np.ones(len(x), bool) if mask is None else np.asarray(mask).reshape(-1)
  p = {n: np.asarray(v, np.float64) for n, v in p.items()}
  logits = x @ p['router']
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(x)
  chosen = np.zeros((len(x), E))
  for t in range(len(x)):
    experts = np.argsort(-probs[t], kind='stable')[:k]     # ties: the lower expert index first
    w = probs[t, experts] / (probs[t, experts].sum() if renormalize else 1.0)
    if not mask[t]:
      continue
    chosen[t, experts] = 1
    for e, we in zip(experts, w):
      h = _silu(x[t] @ p['wi_0'][e]) * (x[t] @ p['wi_1'][e])
      out[t] += we * (h @ p['wo'][e])
  n = mask.sum()
  f, pm = chosen[mask].sum(0) / n, probs[mask].sum(0) / n
  lse = np.log(np.exp(logits).sum(-1))
  return out, E * np.sum(f * pm), np.mean(lse[mask] ** 2), f / f.sum()


def _apply(cfg, p, x, mask):
  y, state = moe_lib.MoE(cfg).apply({'params': p}, jnp.asarray(x), jnp.asarray(mask), mutable=['moe'])
  return np.asarray(y), {k: np.asarray(v) for k, v in state['moe'].items()}


def _x(b=2, t=12, seed=1):
  return np.random.default_rng(seed).normal(0, 1, (b, t, D)).astype(np.float32)


@pytest.mark.parametrize('renormalize', [True, False])
def test_outputs_and_losses_match_the_per_token_reference(renormalize):
  x, p = _x(), _params()
  mask = np.ones(x.shape[:2], bool)
  y, stats = _apply(_cfg(moe_renormalize=renormalize), p, x, mask)
  ref, aux, z, load = reference(x, p, renormalize=renormalize)
  np.testing.assert_allclose(y.reshape(-1, D), ref, atol=2e-5)
  np.testing.assert_allclose(stats['aux_loss'], aux, rtol=1e-5)
  np.testing.assert_allclose(stats['z_loss'], z, rtol=1e-5)
  np.testing.assert_allclose(stats['load'], load, atol=1e-6)
  other, *_ = reference(x, p, renormalize=not renormalize)     # the renormalisation is visible
  assert np.abs(other - ref).max() > 1e-2


def test_ties_go_to_the_lower_expert_and_one_expert_can_take_every_token():
  x, p = np.abs(_x()), _params()
  p['router'][:, 2] = p['router'][:, 1]             # experts 1 and 2 always tie
  p['router'][:, 0] = 5.0                           # x > 0: every token's first choice is expert 0
  p['router'][:, 3] = -5.0                          # ... and expert 3 never
  y, stats = _apply(_cfg(), p, x, np.ones(x.shape[:2], bool))
  ref, aux, _, load = reference(x, p)
  np.testing.assert_allclose(y.reshape(-1, D), ref, atol=2e-5)
  np.testing.assert_allclose(stats['aux_loss'], aux, rtol=1e-5)
  assert load[0] == pytest.approx(0.5) and stats['load'][0] == pytest.approx(0.5)
  np.testing.assert_allclose(stats['load'], [0.5, 0.5, 0.0, 0.0], atol=1e-6)   # every tie went to expert 1


def test_padding_is_routed_nowhere_and_left_out_of_the_statistics():
  x, p = _x(), _params()
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])   # packed documents, then padding
  y, stats = _apply(_cfg(), p, x, segments > 0)
  ref, aux, z, load = reference(x, p, mask=segments > 0)
  np.testing.assert_allclose(y.reshape(-1, D), ref, atol=2e-5)
  assert np.all(y[0, 9:] == 0)
  np.testing.assert_allclose([stats['aux_loss'], stats['z_loss']], [aux, z], rtol=1e-5)
  np.testing.assert_allclose(stats['load'], load, atol=1e-6)


def _reference_jnp(p, x, experts, renormalize=True):
  """The same per-token loop in jnp, the chosen experts given: differentiable, for the gradients."""
  x = x.reshape(-1, D)
  probs = jax.nn.softmax(x @ p['router'], -1)
  rows = []
  for t in range(x.shape[0]):
    w = probs[t, experts[t]]
    w = w / w.sum() if renormalize else w
    rows.append(sum(w[j] * ((jax.nn.silu(x[t] @ p['wi_0'][e]) * (x[t] @ p['wi_1'][e])) @ p['wo'][e])
                    for j, e in enumerate(experts[t])))
  return jnp.stack(rows)


def test_gradients_match_the_per_token_reference():
  x, p = _x(b=1, t=6), _params()
  mask = np.ones(x.shape[:2], bool)
  probs = jax.nn.softmax(x.reshape(-1, D) @ p['router'], -1)
  experts = [list(np.argsort(-np.asarray(r), kind='stable')[:K]) for r in probs]
  cotangent = np.random.default_rng(3).normal(0, 1, (6, D)).astype(np.float32)

  def ours(p, x):
    y, _ = moe_lib.MoE(_cfg()).apply({'params': p}, x, jnp.asarray(mask), mutable=['moe'])
    return jnp.sum(y.reshape(-1, D) * cotangent)

  def ref(p, x):
    return jnp.sum(_reference_jnp(p, x, experts) * cotangent)

  got, want = jax.grad(ours, argnums=(0, 1))(p, x), jax.grad(ref, argnums=(0, 1))(p, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert np.abs(np.asarray(got[0]['router'])).max() > 1e-3   # the router learns through the top-k weights


def test_the_training_objective_adds_the_weighted_aux_and_z_losses():
  stats = {'aux_loss': jnp.array([1.5, 2.5]), 'z_loss': jnp.array([3.0, 5.0]), 'load': jnp.full((2, E), 0.25),
           'entropy': jnp.array([1.0, 1.2]), 'logit_max': jnp.array([2.0, 3.0]), 'dropped': jnp.zeros(2)}
  cfg = _cfg(moe_aux_loss=0.1, moe_router_z_loss=0.01)
  add, metrics = moe_terms.terms(cfg, stats, 10.0)
  assert float(add) == pytest.approx((0.1 * 2.0 + 0.01 * 4.0) * 10.0)
  assert float(metrics['moe_aux_loss']) == pytest.approx(20.0) and 'layers/1/moe_entropy' in metrics
  assert float(moe_terms.terms(_cfg(moe_aux_loss=0.0, moe_router_z_loss=0.0), stats, 10.0)[0]) == 0.0


def test_dropless_equals_capacity_mode_when_capacity_suffices():
  x, p = _x(), _params()
  mask = np.ones(x.shape[:2], bool)
  dropless, _ = _apply(_cfg(), p, x, mask)
  roomy, stats = _apply(_cfg(moe_capacity_factor=E / K), p, x, mask)   # capacity T: nothing can drop
  np.testing.assert_allclose(roomy, dropless, atol=1e-5)
  assert float(stats['dropped']) == 0.0


def test_capacity_mode_drops_and_counts_exactly_the_overflow():
  x, p = np.abs(_x(b=1, t=8)), _params()
  p['router'][:, 0], p['router'][:, 1] = 5.0, 4.0   # every token: experts 0 and 1
  segments = np.array([[1] * 6 + [0] * 2])          # 6 real tokens, 2 padding
  # capacity ceil(1.0 * 8 * 2 / 4) = 4 slots per expert: experts 0 and 1 each get 6 and keep 4
  y, stats = _apply(_cfg(moe_capacity_factor=1.0), p, x, segments > 0)
  assert float(stats['dropped']) == pytest.approx(4 / 12)
  ref, *_ = reference(x[:, :4], p)                  # the first 4 tokens keep both experts
  np.testing.assert_allclose(y[0, :4], ref, atol=2e-5)
  assert np.all(y[0, 4:] == 0)                      # tokens 5-6 lost both, padding has none


@pytest.mark.parametrize('kernel', ['megablox', 'blocked'])   # megablox: the Pallas kernel, interpreted on CPU
def test_each_grouped_matmul_kernel_equals_ragged_dot(kernel):
  x, p = _x(b=2, t=16), _params()
  p['router'][:, 3] = -5.0                                    # an expert with no rows: an empty group
  mask = np.ones(x.shape[:2], bool)
  ragged, _ = _apply(_cfg(moe_kernel='ragged_dot'), p, x, mask)
  other, _ = _apply(_cfg(moe_kernel=kernel), p, x, mask)
  np.testing.assert_allclose(other, ragged, atol=1e-5)
  def loss(p, kernel):
    return jnp.sum(moe_lib.MoE(_cfg(moe_kernel=kernel)).apply({'params': p}, x, mask, mutable=['moe'])[0] ** 2)
  for a, b in zip(jax.tree.leaves(jax.grad(loss)(p, kernel)), jax.tree.leaves(jax.grad(loss)(p, 'ragged_dot'))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_a_shared_expert_is_added_to_every_token():
  x = _x()
  cfg = _cfg(moe_shared_mlp_dim=8)
  variables = moe_lib.MoE(cfg).init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.ones(x.shape[:2], bool))
  params = flax.linen.meta.unbox(variables['params'])
  assert params['shared']['wi_0']['kernel'].shape == (D, 8)
  y, _ = moe_lib.MoE(cfg).apply({'params': params}, x, jnp.ones(x.shape[:2], bool), mutable=['moe'])
  without, _ = moe_lib.MoE(_cfg()).apply({'params': {k: v for k, v in params.items() if k != 'shared'}}, x,
                                         jnp.ones(x.shape[:2], bool), mutable=['moe'])
  assert np.abs(np.asarray(y) - np.asarray(without)).max() > 1e-4


MOE_DEFAULT = 'configs/moe_default.py'


@pytest.mark.parametrize('overrides, message', [
    (['--config.model.num_experts_per_tok=9'], 'model.num_experts_per_tok=9 must be between 1 and model.num_experts=8'),
    (['--config.mesh.expert=3'], 'mesh.expert=3 does not divide model.num_experts=8'),
    (['--config.model.moe_first_dense=1'], 'a scanned stack needs every layer alike; set model.scan_layers=false'),
    (['--config.model.num_experts=0', '--config.mesh.expert=2'], 'mesh.expert=2 splits the experts of an MoE model'),
    (['--config.model.moe_kernel=gmm'], "model.moe_kernel='gmm' is not one of auto, ragged_dot, megablox, blocked"),
])
def test_bad_moe_options_fail_in_one_line_before_compiling(overrides, message):
  from fmjax import config
  with pytest.raises(config.ConfigError) as e:
    config.resolve(MOE_DEFAULT, overrides)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_first_dense_layers_then_moe_unrolled():
  from fmjax.model import Transformer
  cfg = _cfg(num_layers=3, moe_first_dense=1, scan_layers=False)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = flax.linen.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)['params'])
  assert 'mlp' in params['layers_0'] and 'moe' in params['layers_1'] and 'moe' in params['layers_2']
  _, state = Transformer(cfg).apply({'params': params}, tokens, mutable=['moe'])
  assert moe_terms.stacked(state['moe'], cfg)['aux_loss'].shape == (2,)


@pytest.mark.slow   # 36 s on the 2-core machine: with the slow suite
def test_lora_on_attention_of_an_moe_model_starts_at_the_base_and_trains_the_adapters():
  from fmjax.model import Transformer, lora
  cfg = lora.with_lora(_cfg(), 4, 8.0, ('q', 'k', 'v', 'o'))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)
  params = flax.linen.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)['params'])
  assert 'lora_a' in params['layers']['attn']['q'] and set(params['layers']['moe']) == {'router', 'wi_0', 'wi_1',
                                                                                          'wo'}
  plain = Transformer(_cfg()).apply({'params': lora.strip_adapters(params)}, tokens)
  np.testing.assert_allclose(np.asarray(Transformer(cfg).apply({'params': params}, tokens)), np.asarray(plain),
                             atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(Transformer(cfg).apply({'params': p}, tokens) ** 2))(params)
  assert float(jnp.abs(grads['layers']['attn']['q']['lora_b']).max()) > 0

