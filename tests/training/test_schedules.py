"""Learning-rate schedules (optim.schedule): closed forms, WSD's decay start, a cooldown resumed from a constant
run equal bit for bit to one WSD run, the narrow resume rule that allows it, and the one-line errors."""

import json
import math
import os

import numpy as np
import optax
import pytest

from fmjax import config
from fmjax.checkpoints import resume
from fmjax.checkpoints import store
from fmjax.train import train
from fmjax.training import optim, schedules
from helpers import assert_same_tree, losses_of, text_run_config

PEAK, END, WARMUP, TOTAL = 1e-3, 1e-4, 10, 100


def schedule_cfg(**extra):
  cfg = config.base_config().optim
  cfg.update({**dict(learning_rate=PEAK, end_learning_rate=END, warmup_steps=WARMUP), **extra})
  return cfg


def rates(cfg, steps, total=TOTAL):
  fn = schedules.learning_rate_schedule(cfg, total)
  return np.array([float(fn(s)) for s in steps])


def test_cosine_is_optax_warmup_cosine_decay():
  want = optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, TOTAL, END)
  steps = range(0, 110, 3)
  assert rates(schedule_cfg(), steps).tolist() == [float(want(s)) for s in steps]


def test_schedule_warms_up_then_decays_to_end_value():
  sched = optim.learning_rate_schedule(schedule_cfg(), 100)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(100)) == pytest.approx(1e-4)
  assert float(sched(5)) == pytest.approx(5e-4)


def closed_form(name, step, shape='sqrt', start=80):
  if step < WARMUP:
    return PEAK * step / WARMUP
  if name == 'constant':
    return PEAK
  if name == 'inverse_sqrt':
    return PEAK * math.sqrt(WARMUP / step)
  begin = WARMUP if name == 'linear' else start
  frac = min(max((step - begin) / (TOTAL - begin), 0.0), 1.0)
  left = {'linear': 1 - frac, 'cosine': 0.5 * (1 + math.cos(math.pi * frac)), 'sqrt': 1 - math.sqrt(frac)}[
      'linear' if name == 'linear' else shape]
  return END + (PEAK - END) * left


@pytest.mark.parametrize('name, extra', [
    ('linear', {}), ('constant', {}), ('inverse_sqrt', {}),
    ('wsd', dict(decay_shape='linear')), ('wsd', dict(decay_shape='cosine')), ('wsd', dict(decay_shape='sqrt')),
])
def test_schedules_follow_their_closed_forms(name, extra):
  steps = [0, 3, 9, 10, 11, 40, 79, 80, 81, 90, 99, 100, 120]
  got = rates(schedule_cfg(schedule=name, **extra), steps)
  want = [closed_form(name, s, extra.get('decay_shape', 'sqrt')) for s in steps]   # wsd: fraction 0.2 -> 80
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_wsd_decay_start_from_the_fraction_or_given():
  assert schedules.decay_start(schedule_cfg(schedule='wsd', decay_fraction=0.25), 60) == 45
  assert schedules.decay_start(schedule_cfg(schedule='wsd', decay_fraction=1.0), 60) == 0
  assert schedules.decay_start(schedule_cfg(schedule='wsd', decay_start=40), 60) == 40
  assert schedules.decay_start(schedule_cfg(schedule='wsd', decay_fraction=0.5, decay_steps=200), 60) == 100
  stable = rates(schedule_cfg(schedule='wsd', decay_start=40, warmup_steps=0), range(40), total=60)
  assert set(stable.tolist()) == {np.float32(PEAK).item()}
  assert schedules.describe(schedule_cfg(schedule='wsd', decay_start=40), 60) == (
      'schedule wsd: warmup 10 steps to 0.001, constant to step 40, sqrt decay to 0.0001 at step 60')


@pytest.mark.parametrize('change, message', [
    (dict(schedule='wsd', decay_fraction=0.0), 'optim.decay_fraction=0.0 must be in (0, 1]'),
    (dict(schedule='wsd', decay_fraction=1.5), 'optim.decay_fraction=1.5 must be in (0, 1]'),
    (dict(schedule='wsd', decay_start=5), 'optim.decay_start=5 must be at or after optim.warmup_steps=10'),
    (dict(schedule='wsd', decay_start=100), 'before the end of the schedule, step 100'),
    (dict(schedule='warmup_stable'), "optim.schedule='warmup_stable' is not one of cosine, linear, constant"),
    (dict(schedule='wsd', decay_shape='exp'), "optim.decay_shape='exp' is not one of linear, cosine, sqrt"),
])
def test_bad_schedules_are_one_line(change, message):
  cfg = config.base_config()
  cfg.steps = TOTAL
  cfg.optim.update(dict(warmup_steps=WARMUP, **change))
  with pytest.raises(config.ConfigError) as e:
    config.validate(cfg)
  assert message in str(e.value) and '\n' not in str(e.value)


# --- a cooldown from a checkpoint -------------------------------------------------------------------------

def run_config(tmp_path, steps, **optim_fields):
  return text_run_config(tmp_path, steps=steps, checkpoint_every=0, log_every=10,
                         optim=dict(warmup_steps=5, learning_rate=3e-3, end_learning_rate=0.0, **optim_fields))


@pytest.mark.slow   # a whole run: with the slow suite (CI runs both)
def test_constant_run_resumed_into_its_cooldown_equals_one_wsd_run_bit_for_bit(tmp_path, capsys):
  """Constant to step 40, then a resume that decays from 40 to 60, is one WSD run of 60 steps decaying from
  40: the same parameters, bit for bit, and the cooldown is logged and saved."""
  single = train(run_config(tmp_path / 'single', 60, schedule='wsd', decay_start=40))
  train(run_config(tmp_path / 'split', 40, schedule='constant'))
  resumed_cfg = run_config(tmp_path / 'split', 60, schedule='wsd', decay_start=40)
  resumed = train(resumed_cfg)
  assert sorted(losses_of(resumed)) == [50, 60]
  assert dict(resumed.history)[60]['learning_rate'] < 1e-4 < dict(resumed.history)[50]['learning_rate'] < 3e-3
  assert_same_tree(resumed.state.params, single.state.params)
  a, b = resumed.state.opt_state[1][0], single.state.opt_state[1][0]   # AdamW's moments
  assert_same_tree((a.mu, a.nu), (b.mu, b.nu))
  assert int(a.count) == int(b.count) == 60
  assert losses_of(resumed) == {s: losses_of(single)[s] for s in (50, 60)}
  meta = store.Checkpointer(os.path.join(resumed_cfg.workdir, 'checkpoints')).read_metadata(60)
  assert meta['optim'] == {'name': 'adamw', 'schedule': 'wsd', 'learning_rate': 3e-3, 'warmup_steps': 5,
                           'end_step': 60, 'end_learning_rate': 0.0, 'decay_start': 40, 'decay_shape': 'sqrt'}
  log = capsys.readouterr().out
  assert 'cooldown from the checkpoint at step 40: schedule wsd: warmup 5 steps to 0.003, constant to step 40' in log
  assert 'optimizer adamw; state 8.00 bytes per parameter' in log


def saved(tmp_path, steps, step=40, **optim_fields):
  """A workdir whose config.json is that of a run of `steps` steps, with a checkpoint directory at `step`."""
  cfg = text_run_config(tmp_path, steps=steps, optim=optim_fields)
  os.makedirs(os.path.join(cfg.workdir, 'checkpoints', str(step)), exist_ok=True)
  config.save(cfg, os.path.join(cfg.workdir, 'config.json'))
  return cfg


def changes(tmp_path, steps, **optim_fields):
  new = text_run_config(tmp_path, steps=steps, optim=optim_fields)
  return resume.resume_changes(new.workdir, new, resuming=True)


def test_resume_allows_turning_a_constant_run_into_its_cooldown(tmp_path):
  saved(tmp_path, 40, schedule='constant')
  lines = changes(tmp_path, 60, schedule='wsd', decay_start=40)
  assert lines[:3] == ['config change on resume: optim.decay_start: 0 -> 40',
                       'config change on resume: optim.schedule: "constant" -> "wsd"',
                       'config change on resume: steps: 40 -> 60']
  assert lines[3] == ('cooldown from the checkpoint at step 40: schedule wsd: warmup 2 steps to 0.001, constant to '
                      'step 40, sqrt decay to 0.0001 at step 60')
  # the decay start may come from decay_fraction too, and a WSD run still in its stable phase may move it
  assert changes(tmp_path, 100, schedule='wsd', decay_fraction=0.5)[-1].startswith('cooldown')
  saved(tmp_path, 100, schedule='wsd', decay_fraction=0.2)            # decays from 80: not yet at 40
  assert changes(tmp_path, 200, schedule='wsd', decay_fraction=0.2)[-1].startswith('cooldown')
  saved(tmp_path, 60, schedule='constant')                            # a constant run may simply go on
  assert changes(tmp_path, 90, schedule='constant') == ['config change on resume: steps: 60 -> 90']


@pytest.mark.parametrize('before, after, refused', [
    (dict(schedule='constant'), dict(schedule='wsd', decay_start=30), 'optim.schedule "constant" -> "wsd"'),
    (dict(schedule='constant'), dict(schedule='wsd', decay_fraction=0.9), 'optim.schedule "constant" -> "wsd"'),
    (dict(schedule='cosine'), dict(schedule='wsd', decay_start=40), 'optim.schedule "cosine" -> "wsd"'),
    (dict(schedule='constant'), dict(schedule='linear'), 'optim.schedule "constant" -> "linear"'),
    (dict(schedule='constant'), dict(schedule='wsd', decay_start=40, learning_rate=2e-3),
     'optim.learning_rate 0.001 -> 0.002'),
    (dict(schedule='constant'), dict(schedule='wsd', decay_start=40, warmup_steps=5), 'optim.warmup_steps 2 -> 5'),
    (dict(schedule='wsd', decay_fraction=0.5), dict(schedule='wsd', decay_start=50),   # it decayed from 30
     'optim.decay_start 0 -> 50'),
])
def test_resume_still_refuses_other_schedule_changes(tmp_path, before, after, refused):
  saved(tmp_path, 60, **before)
  with pytest.raises(config.ConfigError) as e:
    changes(tmp_path, 60, **after)
  assert refused in str(e.value) and '\n' not in str(e.value)
  if 'learning_rate' in refused or 'warmup' in refused:
    assert 'optim.schedule' not in str(e.value)   # the cooldown part itself is allowed


def test_cooldown_rule_reads_the_checkpoint_step(tmp_path):
  cfg = saved(tmp_path, 40, step=50, schedule='constant')
  new = text_run_config(tmp_path, steps=60, optim=dict(schedule='wsd', decay_start=40))
  with pytest.raises(config.ConfigError, match='optim.schedule'):
    resume.resume_changes(new.workdir, new, resuming=True)                # the checkpoint is at 50 > 40
  assert resume.resume_changes(new.workdir, new, resuming=True, step=40)[-1].startswith('cooldown')
  assert json.load(open(os.path.join(cfg.workdir, 'config.json')))['optim']['schedule'] == 'constant'
