"""Config on resume (check first, then write; differences printed; run-defining changes refused) and
config file errors (one line naming the file and line)."""

import json
import os

import pytest

from fmjax import config, train
from fmjax.checkpoints import resume
from helpers import text_run_config


def saved_workdir(tmp_path, cfg):
  os.makedirs(cfg.workdir, exist_ok=True)
  config.save(cfg, os.path.join(cfg.workdir, 'config.json'))
  return os.path.join(cfg.workdir, 'config.json')


def test_differences_are_listed_one_line_per_key(tmp_path):
  cfg = text_run_config(tmp_path)
  saved_workdir(tmp_path, cfg)
  new = text_run_config(tmp_path, log_every=7, checkpoint_every=3, mesh=dict(fsdp=2))
  new.model.remat = 'full'
  lines = resume.resume_changes(new.workdir, new, resuming=True)
  assert lines == ['config change on resume: checkpoint_every: 200 -> 3', 'config change on resume: log_every: 1 -> 7',
                   'config change on resume: mesh.fsdp: -1 -> 2', 'config change on resume: model.remat: "none" -> "full"']
  assert resume.resume_changes(new.workdir, text_run_config(tmp_path), resuming=True) == []


@pytest.mark.parametrize('change, shown', [
    (dict(optim=dict(learning_rate=2e-3)), 'optim.learning_rate 0.001 -> 0.002'),
    (dict(steps=20), 'steps 10 -> 20'),
    (dict(seed=1), 'seed 0 -> 1'),
    (dict(global_batch_size=16), 'global_batch_size 8 -> 16'),
    (dict(model=dict(num_layers=3)), 'model.num_layers 2 -> 3'),
    (dict(optim=dict(decay_steps=5)), 'optim.decay_steps 0 -> 5'),
    (dict(data=dict(files='/elsewhere/*.txt')), 'data.files'),
])
def test_run_defining_changes_are_refused_in_one_line_and_leave_config_json(tmp_path, change, shown):
  path = saved_workdir(tmp_path, text_run_config(tmp_path))
  before = open(path).read()
  new = text_run_config(tmp_path, **change)
  with pytest.raises(config.ConfigError) as e:
    resume.resume_changes(new.workdir, new, resuming=True)
  text = str(e.value)
  assert shown in text and '--config.allow_config_change=true' in text and '\n' not in text
  assert open(path).read() == before
  new.allow_config_change = True
  lines = resume.resume_changes(new.workdir, new, resuming=True)
  assert any(shown.split(' ')[0] in line and 'allowed by allow_config_change' in line for line in lines)


def test_steps_may_change_when_decay_steps_fixes_the_schedule(tmp_path):
  saved_workdir(tmp_path, text_run_config(tmp_path, optim=dict(decay_steps=10)))
  longer = text_run_config(tmp_path, steps=30, optim=dict(decay_steps=10))
  assert resume.resume_changes(longer.workdir, longer, resuming=True) == ['config change on resume: steps: 10 -> 30']
  moved = text_run_config(tmp_path, steps=30, optim=dict(decay_steps=30))
  with pytest.raises(config.ConfigError, match='optim.decay_steps 10 -> 30'):
    resume.resume_changes(moved.workdir, moved, resuming=True)


def test_no_checkpoint_means_no_resume_and_no_check(tmp_path):
  saved_workdir(tmp_path, text_run_config(tmp_path))
  new = text_run_config(tmp_path, steps=99)
  assert resume.resume_changes(new.workdir, new, resuming=False) == []


def test_classification_of_keys():
  assert resume.is_run_defining('model.d_model') and not resume.is_run_defining('model.attention')
  assert resume.is_run_defining('optim.warmup_steps') and not resume.is_run_defining('optim.b2')
  assert not resume.is_run_defining('finetune.lora_rank') and resume.is_run_defining('finetune.lora_rank', finetune=True)
  assert not resume.is_run_defining('finetune.best_metric', finetune=True)
  assert not resume.is_run_defining('log_every') and not resume.is_run_defining('microbatches')


def test_refused_resume_in_train_leaves_the_workdir_untouched(tmp_path):
  cfg = text_run_config(tmp_path, steps=2, checkpoint_every=2)
  train.train(cfg)
  workdir = cfg.workdir
  files = {name: open(os.path.join(workdir, name)).read() for name in ('config.json', 'metrics.jsonl')}
  with pytest.raises(config.ConfigError, match='optim.learning_rate 0.001 -> 0.5'):
    train.train(text_run_config(tmp_path, steps=4, checkpoint_every=2, optim=dict(learning_rate=0.5)))
  assert {name: open(os.path.join(workdir, name)).read() for name in files} == files
  assert not os.path.exists(os.path.join(workdir, 'fmjax.lock'))   # released after the refusal too
  assert json.loads(files['config.json'])['optim']['learning_rate'] == 1e-3


# Config files -------------------------------------------------------------------------------------

@pytest.mark.parametrize('body, expected', [
    ('def get_config(:\n  pass\n', 'line 1: SyntaxError'),
    ('import numpyy_not_installed\n', "line 1: ModuleNotFoundError: No module named 'numpyy_not_installed'"),
    ('from fmjax.config import base_config\n\ndef get_config():\n  c = base_config()\n  c.model.nosuch.x = 3\n  return c\n',
     'line 5: AttributeError'),
    ('def get_config():\n  return 1 / 0\n', 'line 2: ZeroDivisionError: division by zero'),
])
def test_config_file_errors_are_one_line_naming_file_and_line(tmp_path, body, expected):
  path = tmp_path / 'user_config.py'
  path.write_text(body)
  with pytest.raises(config.ConfigError) as e:
    config.load_config_file(str(path))
  text = str(e.value)
  assert text.startswith(f'error in config file {path} ') and expected in text and '\n' not in text, text


def test_get_config_must_return_a_config_dict(tmp_path):
  path = tmp_path / 'c.py'
  path.write_text('def get_config():\n  return {"steps": 3}\n')
  with pytest.raises(config.ConfigError, match='get_config\\(\\) returned dict'):
    config.load_config_file(str(path))
