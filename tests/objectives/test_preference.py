"""DPO / IPO against a NumPy implementation of the published formulas, on fixed logits."""

import numpy as np
import jax.numpy as jnp
import pytest

from fmjax.objectives import preference


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_dpo(pc, pr, rc, rr, beta, ls, loss, nc, nr):
  """Rafailov et al. 2023 eq. 7, label smoothing as cDPO (Mitchell 2023), IPO as Azar et al. 2023 / TRL."""
  if loss == 'sigmoid':
    h = beta * ((pc - rc) - (pr - rr))
    losses = -(1 - ls) * _np_log_sigmoid(h) - ls * _np_log_sigmoid(-h)
  else:
    h = (pc - rc) / nc - (pr - rr) / nr
    losses = (h - 1 / (2 * beta)) ** 2
  return losses, beta * (pc - rc), beta * (pr - rr)


def _fixed_batch(rng, pairs=3, t=6, v=11):
  logits = rng.normal(size=(2 * pairs, t, v)) * 2
  targets = rng.integers(0, v, size=(2 * pairs, t))
  weights = (rng.random((2 * pairs, t)) > 0.3).astype(np.float32)
  weights[:, 0] = 1.0
  ref = -rng.random((2 * pairs, t)) * 3
  return logits, targets, weights, ref


def _np_token_logps(logits, targets):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize('loss,beta,ls', [('sigmoid', 0.1, 0.0), ('sigmoid', 0.5, 0.2), ('ipo', 0.3, 0.0)])
def test_pair_metrics_equal_numpy(loss, beta, ls):
  rng = np.random.default_rng(0)
  logits, targets, weights, ref = _fixed_batch(rng)
  batch = {'targets': jnp.asarray(targets), 'weights': jnp.asarray(weights),
           preference.REFERENCE_KEY: jnp.asarray(ref * weights)}
  total, pairs, sums = preference.pair_metrics(preference.token_logps(jnp.asarray(logits, jnp.float32), batch['targets']),
                                               batch, beta, ls, loss)
  lp = (_np_token_logps(logits, targets) * weights).sum(-1)
  rf = (ref * weights).sum(-1)
  n = weights.sum(-1)
  h = len(lp) // 2
  losses, rc, rr = _np_dpo(lp[:h], lp[h:], rf[:h], rf[h:], beta, ls, loss, n[:h], n[h:])
  np.testing.assert_allclose(float(total), losses.sum(), rtol=1e-5)
  assert float(pairs) == h
  np.testing.assert_allclose(float(sums['rewards/chosen']), rc.sum(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(sums['rewards/rejected']), rr.sum(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(sums['rewards/margins']), (rc - rr).sum(), rtol=1e-5, atol=1e-6)
  assert float(sums['rewards/accuracies']) == float(((rc - rr) > 0).sum())


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
  """At the start (policy = reference) the sigmoid loss is log 2 per pair and every reward is 0."""
  x = jnp.asarray([-3.0, -7.5])
  t = preference.dpo_terms(x, x + 1, x, x + 1, beta=0.1)
  np.testing.assert_allclose(np.asarray(t['loss']), np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(t['rewards_chosen']), 0.0)


def test_beta_to_zero_limit_and_label_smoothing():
  """beta -> 0: loss -> log 2 with slope -beta/2 * h (first order); label smoothing 0.5 makes it symmetric."""
  pc, pr, rc, rr = map(jnp.asarray, ([-2.0], [-5.0], [-3.0], [-4.0]))   # h = 1 - (-1) = 2
  for beta in (1e-1, 1e-2, 1e-3):
    loss = float(preference.dpo_terms(pc, pr, rc, rr, beta)['loss'][0])
    np.testing.assert_allclose(loss, np.log(2) - beta * 2 / 2, rtol=0, atol=beta ** 2 + 1e-6)   # float32: ~1e-7
  a = float(preference.dpo_terms(pc, pr, rc, rr, 1.0, 0.5)['loss'][0])
  b = float(preference.dpo_terms(pr, pc, rr, rc, 1.0, 0.5)['loss'][0])   # chosen and rejected swapped
  np.testing.assert_allclose(a, b, rtol=1e-6)
  smooth = float(preference.dpo_terms(pc, pr, rc, rr, 1.0, 0.1)['loss'][0])
  sharp = float(preference.dpo_terms(pc, pr, rc, rr, 1.0, 0.0)['loss'][0])
  assert smooth > sharp   # smoothing penalises the confident (h = 2) pair


def test_padding_pairs_do_not_count():
  """A pair whose chosen or rejected row has no response token is left out of the sums and the count."""
  rng = np.random.default_rng(1)
  logits, targets, weights, ref = _fixed_batch(rng, pairs=2)
  weights[3] = 0.0          # pair 1's rejected row is padding
  batch = {'targets': jnp.asarray(targets), 'weights': jnp.asarray(weights),
           preference.REFERENCE_KEY: jnp.asarray(ref * weights)}
  logps = preference.token_logps(jnp.asarray(logits, jnp.float32), batch['targets'])
  total, pairs, _ = preference.pair_metrics(logps, batch, 0.1, 0.0, 'sigmoid')
  keep = {k: v[np.array([0, 2])] for k, v in batch.items()}
  total1, pairs1, _ = preference.pair_metrics(logps[np.array([0, 2])], keep, 0.1, 0.0, 'sigmoid')
  assert float(pairs) == 1.0 and float(pairs1) == 1.0
  np.testing.assert_allclose(float(total), float(total1), rtol=1e-6)
