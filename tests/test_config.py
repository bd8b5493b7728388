"""Config: every file loads, overrides are checked for key and type, errors are one line."""

import glob
import os

import pytest

from fmjax import config
from fmjax.train import main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, 'configs', 'default.py')


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))))
def test_every_config_file_resolves(path):
  cfg = config.resolve(path)
  assert cfg.model.num_layers > 0


def test_overrides_apply_with_types():
  cfg = config.resolve(DEFAULT, ['--config.model.num_layers=2', 'optim.learning_rate=3e-4',
                                 '--config.model.scan_layers=false', '--config.data.files=/x/*.txt'])
  assert cfg.model.num_layers == 2 and cfg.optim.learning_rate == 3e-4
  assert cfg.model.scan_layers is False and cfg.data.files == '/x/*.txt'


@pytest.mark.parametrize('override, message', [
    ('--config.model.num_layerz=2', "unknown config key 'model.num_layerz'"),
    ('--config.nosuch.x=1', "unknown config key 'nosuch.x' (no section 'nosuch')"),
    ('--config.model.num_layers=two', 'expected an integer'),
    ('--config.model.scan_layers=maybe', 'expected true/false'),
    ('--config.model.norm=batchnorm', "model.norm='batchnorm' is not one of rmsnorm, layernorm"),
    ('--config.model=3', 'is a section'),
    ('--config.global_batch_size=10', 'must divide into microbatches'),
])
def test_bad_overrides_fail_in_one_line(override, message):
  overrides = [override] + (['--config.microbatches=4'] if 'global_batch' in override else [])
  with pytest.raises(config.ConfigError) as e:
    config.resolve(DEFAULT, overrides)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_config_file_with_an_invented_key_is_rejected(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text('from fmjax.config import base_config\n\ndef get_config():\n  c = base_config()\n'
                  '  with c.unlocked():\n    c.model.widht = 3\n  return c\n')
  with pytest.raises(config.ConfigError, match="unknown config key 'model.widht'"):
    config.resolve(str(path))


def test_cli_reports_user_errors_as_one_line(tmp_path, capsys):
  assert main(['--config', DEFAULT, '--workdir', str(tmp_path), '--config.model.nope=1']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('fmjax.train: error: unknown config key') and '\n' not in err
  assert main(['--config', str(tmp_path / 'missing.py'), '--workdir', str(tmp_path)]) == 2
  assert 'config file not found' in capsys.readouterr().err


def test_space_separated_overrides_are_accepted():
  _, workdir, overrides = parse_args(['--config', 'c.py', '--workdir', 'w', '--config.steps', '5'])
  assert workdir == 'w' and overrides == ['--config.steps=5']


def test_missing_data_path_is_one_clear_line(tmp_path, capsys):
  code = main(['--config', DEFAULT, '--workdir', str(tmp_path / 'w'), '--config.data.source=text',
               f'--config.data.files={tmp_path}/nothing/*.txt'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith('fmjax.train: error:') and 'nothing/*.txt' in err and '\n' not in err, err


def test_mesh_that_does_not_fit_is_reported_by_the_cli(tmp_path, capsys):
  code = main(['--config', DEFAULT, '--workdir', str(tmp_path / 'w'), '--config.mesh.data=3',
               '--config.mesh.fsdp=3'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and 'needs 9 devices but 8 are available' in err and '\n' not in err
