"""Resume after a damaged checkpoint, through train(): the one-line advice, followed, resumes exactly."""

import os

import pytest

from fmjax.checkpoints import store as checkpoint
from fmjax.train import train
from helpers import losses_of, text_run_config

pytestmark = pytest.mark.slow


def test_a_damaged_checkpoint_through_train_and_the_advice_works(tmp_path):
  """The store-level message (file, intact step) is checked in tests/checkpoints/test_faults.py; here the
  same one line reaches train() and following its advice resumes from the intact checkpoint exactly."""
  first = train(text_run_config(tmp_path, steps=4, checkpoint_every=2))
  checkpoints = os.path.join(str(tmp_path / 'workdir'), 'checkpoints')
  state_dir = os.path.join(checkpoints, '4', 'state')
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name.endswith('.zarray') or 'manifest' in name or name == '_METADATA':
        with open(os.path.join(root, name), 'w') as f:
          f.write('garbage')
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(text_run_config(tmp_path, steps=4))
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'cannot restore checkpoint 4 in {checkpoints}: it is damaged: ')
  assert f'checkpoint 2 is intact: move this one aside (mv {checkpoints}/4 {checkpoints}/4.bad)' in message
  assert os.path.isdir(state_dir)  # nothing deleted
  os.rename(os.path.join(checkpoints, '4'), os.path.join(checkpoints, '4.bad'))   # as the message says
  resumed = train(text_run_config(tmp_path, steps=4))
  assert sorted(losses_of(resumed)) == [3, 4]
  for s in (3, 4):  # checkpoint 2 was intact: the redone steps match the first run's
    assert losses_of(resumed)[s] == pytest.approx(losses_of(first)[s], rel=1e-5)
