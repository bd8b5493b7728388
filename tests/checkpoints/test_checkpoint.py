"""Checkpoints: exact resume, restore onto another mesh, mismatches rejected."""

import json
import os

import numpy as np
import pytest

from fmjax.checkpoints import store as checkpoint
from fmjax.train import train
from helpers import losses_of, text_run_config


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
  schedule = dict(decay_steps=20)  # the same schedule whether the run is told 10 or 20 steps
  full = train(text_run_config(tmp_path / 'a', steps=20, checkpoint_every=10, optim=schedule))
  first = train(text_run_config(tmp_path / 'b', steps=10, checkpoint_every=10, optim=schedule))
  resumed_cfg = text_run_config(tmp_path / 'b', steps=20, checkpoint_every=10, optim=schedule,
                                allow_config_change=True)  # steps 10 -> 20 with the same schedule
  resumed = train(resumed_cfg)
  want, got = losses_of(full), losses_of(resumed)
  assert sorted(got) == list(range(11, 21))       # it started from step 10
  for s in range(11, 21):
    assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), s
  assert losses_of(first) == {s: want[s] for s in range(1, 11)}
  assert want[20] < want[1]
  saved = json.load(open(os.path.join(resumed_cfg.workdir, 'config.json')))
  assert saved['model']['d_model'] == 32 and saved['steps'] == 20
  meta = checkpoint.Checkpointer(os.path.join(resumed_cfg.workdir, 'checkpoints')).read_metadata(20)
  assert meta['model']['num_layers'] == 2 and meta['scan_layers'] is True and meta['tokenizer'] == 'byte'
  assert meta['fmjax_version']


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_checkpoint_from_2x2x2_restores_on_8x1x1_and_trains_on(tmp_path):
  mesh_a = dict(data=2, fsdp=2, tensor=2)
  mesh_b = dict(data=8, fsdp=1, tensor=1)
  sched = dict(decay_steps=7)
  train(text_run_config(tmp_path, steps=4, checkpoint_every=4, mesh=mesh_a, optim=sched))
  result = train(text_run_config(tmp_path, steps=7, checkpoint_every=4, mesh=mesh_b, optim=sched,
                                 allow_config_change=True))
  assert sorted(losses_of(result)) == [5, 6, 7]
  assert all(np.isfinite(v) for v in losses_of(result).values())
  reference = train(text_run_config(tmp_path / 'ref', steps=7, checkpoint_every=0, mesh=mesh_a, optim=sched))
  for s in (5, 6, 7):  # same data order and state: the losses agree with a run that stayed on (2,2,2)
    assert losses_of(result)[s] == pytest.approx(losses_of(reference)[s], rel=1e-5)
  q = result.state.params['layers']['attn']['q']['kernel']
  assert q.sharding.spec[1] == ('fsdp', 'sequence') and q.addressable_shards[0].data.shape == q.shape  # fsdp=1: whole


def test_checkpoint_with_another_model_shape_is_rejected_in_one_line(tmp_path):
  train(text_run_config(tmp_path, steps=2, checkpoint_every=2))
  cfg = text_run_config(tmp_path, steps=4)
  cfg.model.d_model = 48
  with pytest.raises(checkpoint.CheckpointError, match=r'model.d_model=32 but the config has 48') as e:
    train(cfg)
  assert '\n' not in str(e.value)


