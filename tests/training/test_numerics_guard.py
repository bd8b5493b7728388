"""Numerics guard: non-finite steps stop the run (or are skipped), nothing non-finite is saved,
divergence warnings, and config validation of hyperparameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config, train
from fmjax.training import build
from fmjax.training import loop
from fmjax.training import writers as metric_writers
from fmjax.training import numerics
from fmjax.parallel import sharding as shd
from helpers import synthetic_batch, tiny_config, with_fields


@pytest.fixture(scope='module')
def runs():
  """The plain compiled run and the same run with the step that skips non-finite steps."""
  cfg = tiny_config()
  cfg.mesh.update(dict(data=1, fsdp=1, tensor=1))
  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
  run = build.build_lm_run(cfg, mesh)
  skipping = build.build_lm_run(with_fields(cfg.copy_and_resolve_references(), skip_nonfinite_steps=1), mesh)
  return cfg, run, skipping


def batches(cfg, bad_steps=()):
  """Synthetic batches for steps 1, 2, ...; those in `bad_steps` have nan weights (nan loss and gradients)."""
  step = 0
  while True:
    step += 1
    b = synthetic_batch(cfg.global_batch_size, cfg.seq_len, cfg.model.vocab_size, seed=step)
    if step in bad_steps:
      b['weights'] = np.full_like(b['weights'], np.nan)
    yield b


def run_loop(tmp_path, cfg, run, bad_steps=(), steps=6, log_every=5, checkpoint_every=2, skip=0, train_step=None):
  saved = []

  def save(step, state, wait):
    saved.append((step, all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))))

  writer = metric_writers.MetricWriter(str(tmp_path), steps, progress_bar=False)
  try:
    result = loop.run_loop(
        train_step=train_step or run.train_step, state=run.init(jax.random.PRNGKey(0)),
        batches=batches(cfg, bad_steps), batch_sharding=run.batch_sharding, start_step=0, total_steps=steps,
        writer=writer, model_cfg=cfg.model, seq_len=cfg.seq_len, tokens_per_step=cfg.global_batch_size * cfg.seq_len,
        log_every=log_every, checkpoint_every=checkpoint_every, save=save, cpu_peak_flops=1e9,
        guards=numerics.GuardConfig(skip_nonfinite_steps=skip))
  finally:
    writer.close()
  return result, saved


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('bad', [3, 4])   # 3: seen one step late; 4: seen at the checkpoint of step 4
def test_first_nonfinite_step_stops_the_run_and_is_never_saved(tmp_path, runs, bad):
  cfg, run, _ = runs
  with pytest.raises(numerics.NonFiniteError) as e:
    run_loop(tmp_path, cfg, run, bad_steps=(bad,))
  text = str(e.value)
  assert text.startswith(f'step {bad}: the loss is nan and the gradient norm is nan'), text
  assert 'last checkpoint written is step 2' in text and '\n' not in text


def test_finite_run_saves_every_checkpoint(tmp_path, runs):
  cfg, run, _ = runs
  result, saved = run_loop(tmp_path, cfg, run)
  assert saved == [(2, True), (4, True), (6, True)]
  assert all('nonfinite' not in m for _, m in result.history)


def test_skip_step_keeps_params_and_optimizer_state_exactly(runs):
  cfg, run, skipping = runs
  good, bad = batches(cfg), batches(cfg, bad_steps=(1,))
  put = lambda b: {k: jax.device_put(v, run.batch_sharding) for k, v in b.items()}
  state = run.init(jax.random.PRNGKey(0))
  before = leaves((state.params, state.opt_state))
  state, metrics = skipping.train_step(state, put(next(bad)))
  assert float(metrics['nonfinite']) == 1.0 and math.isnan(float(metrics['loss']))
  assert int(state.step) == 1
  for a, b in zip(leaves((state.params, state.opt_state)), before):
    np.testing.assert_array_equal(a, b)
  for _ in range(2):   # good steps still train (the first at learning rate 0: optax's count was not advanced)
    state, metrics = skipping.train_step(state, put(next(good)))
    assert float(metrics['nonfinite']) == 0.0
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(state.params), before))
  plain = run.init(jax.random.PRNGKey(0))
  plain, _ = run.train_step(plain, put(next(batches(cfg, bad_steps=(1,)))))
  assert not all(np.isfinite(x).all() for x in leaves(plain.params))   # without skipping the nan lands


def test_skipped_steps_are_counted_and_the_limit_stops_the_run(tmp_path, runs):
  cfg, _, skipping = runs
  result, saved = run_loop(tmp_path / 'a', cfg, skipping, bad_steps=(2, 4), log_every=1, skip=2)
  assert [s for s, _ in saved] == [2, 4, 6] and all(ok for _, ok in saved)
  counts = {s: m['skipped_steps'] for s, m in result.history}
  assert counts == {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}
  assert all(math.isfinite(m['loss']) for s, m in result.history if s not in (2, 4))
  with pytest.raises(numerics.NonFiniteError, match='2 non-finite steps .last: 2, 4. exceed skip_nonfinite_steps=1'):
    run_loop(tmp_path / 'b', cfg, skipping, bad_steps=(2, 4), skip=1)


def test_a_state_that_overflows_with_finite_metrics_is_not_saved(tmp_path, runs):
  cfg, run, _ = runs

  def overflowing_step(state, batch):
    state, metrics = run.train_step(state, batch)
    if int(state.step) == 2:   # the update made the parameters inf while loss and gradients were finite
      state = state.replace(params=jax.tree.map(lambda p: p * jnp.float32(1e38) * 10, state.params))
    return state, metrics

  with pytest.raises(numerics.NonFiniteError, match=r'^step 2: \d+ values of the parameters became non-finite'):
    run_loop(tmp_path, cfg, run, train_step=overflowing_step)


def feed(monitor, losses, grads=None, start=1):
  out = []
  for i, loss in enumerate(losses):
    host = {'loss': loss, 'grad_norm': 1.0 if grads is None else grads[i]}
    out += [(start + i, w) for w in monitor.update(start + i, host)]
  return out


def test_divergence_warns_once_after_warmup_and_not_on_noisy_descent():
  rng = np.random.default_rng(0)
  descent = list(5.0 * np.exp(-np.arange(200) / 50) + 0.5 + rng.normal(0, 0.1, 200))
  assert feed(numerics.DivergenceMonitor(3.0, 10.0, after_step=10), descent) == []
  rising = [2.0] * 20 + [2.0 * 1.2 ** k for k in range(1, 30)]
  warnings = feed(numerics.DivergenceMonitor(3.0, 0.0, after_step=5), rising)
  assert len(warnings) == 1 and 'the loss (moving average' in warnings[0][1] and 'x its minimum 2' in warnings[0][1]
  ema, lowest, first = None, math.inf, None   # independent recomputation of the documented rule
  for i, loss in enumerate(rising, start=1):
    ema = loss if ema is None else 0.9 * ema + 0.1 * loss
    lowest = min(lowest, ema) if i > 5 else lowest
    if i >= 5 + 5 and ema > 3.0 * max(lowest, 0.1):
      first = i
      break
  assert warnings[0][0] == first and first > 21
  assert feed(numerics.DivergenceMonitor(0.0, 0.0), rising) == []                          # 0 = off
  assert feed(numerics.DivergenceMonitor(3.0, 0.0, after_step=100), rising) == []          # still warming up


def test_gradient_spike_warns_once():
  grads = [1.0] * 10 + [50.0] + [1.0] * 5 + [80.0]
  warnings = feed(numerics.DivergenceMonitor(0.0, 10.0), [3.0] * len(grads), grads)
  assert [s for s, _ in warnings] == [11] and 'gradient norm 50 is 50x its moving average 1' in warnings[0][1]
  assert feed(numerics.DivergenceMonitor(0.0, 100.0), [3.0] * len(grads), grads) == []


@pytest.mark.parametrize('key, value, message', [
    ('optim.learning_rate', float('nan'), 'optim.learning_rate must be a finite number > 0, got nan'),
    ('optim.learning_rate', float('inf'), 'optim.learning_rate must be a finite number > 0, got inf'),
    ('optim.learning_rate', 0.0, 'optim.learning_rate must be a finite number > 0'),
    ('optim.eps', 0.0, 'optim.eps must be a finite number > 0'),
    ('optim.b1', 1.0, 'optim.b1 must be a finite number in [0, 1)'),
    ('optim.b2', -0.1, 'optim.b2 must be a finite number in [0, 1)'),
    ('optim.grad_clip', -1.0, 'optim.grad_clip must be a finite number >= 0'),
    ('optim.weight_decay', float('nan'), 'optim.weight_decay must be a finite number >= 0, got nan'),
    ('optim.warmup_steps', -1, 'optim.warmup_steps must be a finite number >= 0'),
    ('optim.end_learning_rate', -1e-4, 'optim.end_learning_rate must be a finite number >= 0'),
    ('z_loss', float('inf'), 'z_loss must be a finite number >= 0'),
    ('model.dropout', 1.0, 'model.dropout must be a finite number in [0, 1)'),
    ('skip_nonfinite_steps', -1, 'skip_nonfinite_steps must be a finite number >= 0'),
    ('divergence_factor', 0.5, 'divergence_factor must be 0 (off) or > 1'),
    ('keep_checkpoints', 0, 'keep_checkpoints must be a finite number >= 1'),
])
def test_meaningless_hyperparameters_are_refused_in_one_line(key, value, message):
  cfg = config.apply_overrides(config.base_config(), [f'{key}={value}'])
  with pytest.raises(config.ConfigError) as e:
    config.validate(cfg)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_sensible_edge_values_are_accepted():
  cfg = config.apply_overrides(config.base_config(), ['optim.warmup_steps=0', 'optim.weight_decay=0',
                                                      'optim.grad_clip=0', 'optim.b1=0', 'divergence_factor=0',
                                                      'optim.end_learning_rate=0', 'optim.learning_rate=1e30'])
  config.validate(cfg)


def test_a_nonfinite_moe_router_logit_flags_the_step_and_is_named():
  """An MoE loss reports its largest router logit (fmjax/objectives/moe_terms.py); the step's nonfinite flag
  covers it even when the loss itself is finite, and the stop line names it."""
  import optax
  from fmjax.training import step as step_lib
  from fmjax.training.state import TrainState

  def loss(params, batch, rng):
    logit = jnp.where(batch['inputs'][0, 0] > 0, jnp.inf, 3.0)
    return params['w'] * 0.0 + 1.0, (1.0, 1.0, {'moe_router_logit_max': logit})

  step = jax.jit(step_lib.make_train_step(loss, optax.sgd(0.1), lambda s: 0.1))
  state = TrainState(step=jnp.zeros((), jnp.int32), params={'w': jnp.ones(())}, opt_state=optax.sgd(0.1).init(
      {'w': jnp.ones(())}))
  flags = [float(step(state, {'inputs': jnp.full((1, 1), v)})[1]['nonfinite']) for v in (0, 1)]
  assert flags == [0.0, 1.0]
  assert numerics.describe_step({'loss': 2.0, 'moe_router_logit_max': math.inf}) == \
      'the largest MoE router logit is inf'
