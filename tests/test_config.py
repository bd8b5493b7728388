"""Config: every file loads, overrides are checked for key and type, errors are one line."""

import glob
import os

import pytest

from fmjax import config
from fmjax import cli
from fmjax.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, 'configs', 'default.py')


# Run configs (fmjax.train / finetune / bench); configs/curate_*.py hold fmjax.curate's own schema.
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '[!_]*.py')) if 'fmjax.curate' not in open(p).read())
BYTE_VOCAB = 259
# The allowed values, written out here independently of config._CHOICES.
ALLOWED = {
    'model.kind': {'decoder', 'encoder'}, 'model.norm_position': {'pre', 'post', 'sandwich', 'after'},
    'model.rope_scaling': {'none', 'linear', 'llama3'},
    'model.activation': {'swiglu', 'geglu', 'gelu', 'gelu_exact'}, 'model.norm': {'rmsnorm', 'layernorm'},
    'model.positions': {'rope', 'learned'}, 'model.remat': {'none', 'full', 'dots', 'names'},
    'model.param_dtype': {'float32', 'bfloat16'}, 'model.dtype': {'float32', 'bfloat16'},
    'data.source': {'stdlib', 'text', 'jsonl', 'parquet', 'tfds'}, 'data.split_by': {'file', 'paragraph'},
    'finetune.task': {'classify', 'lm', 'prompt', 'sft', 'dpo'}, 'finetune.pooling': {'last', 'mean', 'cls'},
    'finetune.best_mode': {'max', 'min'},
}


def _keys(tree, prefix=''):
  out = set()
  for k, v in tree.items():
    out |= _keys(v, f'{prefix}{k}.') if hasattr(v, 'items') else {prefix + k}
  return out


def test_every_shipped_config_is_found():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {'default.py', 'nanogpt_cpu.py', 'gpt2_124m.py', 'llama_1b.py', 'llama_7b.py', 'finetune_stdlib.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_config_file_resolves_and_holds_its_invariants(path):
  cfg = config.resolve(path)
  assert _keys(cfg) == _keys(config.base_config())     # exactly the schema: nothing missing, nothing invented
  for key, allowed in ALLOWED.items():
    section, leaf = key.split('.')
    assert cfg[section][leaf] in allowed, (key, cfg[section][leaf])
  m = cfg.model
  kv = m.num_kv_heads or m.num_heads
  assert min(m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.mlp_dim) > 0
  assert m.head_dim or m.d_model % m.num_heads == 0, 'd_model must split over the heads'
  assert m.num_heads % kv == 0
  assert m.positions == 'rope' or cfg.seq_len <= m.max_seq_len
  assert cfg.global_batch_size % cfg.microbatches == 0 and cfg.steps > 0
  assert 0.0 <= cfg.data.validation_fraction < 1.0
  assert 0 <= cfg.optim.warmup_steps < cfg.steps and cfg.optim.end_learning_rate <= cfg.optim.learning_rate
  assert all(v == -1 or v > 0 for k, v in cfg.mesh.items() if k != 'dcn')
  assert all(v > 0 for v in cfg.mesh.dcn.values())
  documented = [a for argv in _documented_commands()[os.path.basename(path)] for a in argv]
  if cfg.data.tokenizer == 'byte' and not any(a.startswith('--config.data.tokenizer=') for a in documented):
    assert m.vocab_size >= BYTE_VOCAB, 'the byte tokenizer needs 259 ids'
  if cfg.data.source in ('text', 'jsonl') and not cfg.data.files:
    assert any(a.startswith('--config.data.files=') for a in documented), 'data.files: unset and undocumented'


def _documented_commands():
  """{config file name: [argv, ...]} of the shell commands in each config's docstring."""
  import ast
  import shlex
  out = {}
  for path in CONFIGS:
    doc = ast.get_docstring(ast.parse(open(path).read())) or ''
    lines = doc.replace('\\\n', ' ').splitlines()
    out[os.path.basename(path)] = [shlex.split(l.strip()) for l in lines if l.strip().startswith('python ')]
  return out


def _shakespeare_like(path):
  """A text with blank-line paragraphs and exactly 65 distinct characters, like tiny Shakespeare."""
  import string
  alphabet = '\n !$&\',-.3:;?' + string.ascii_uppercase + string.ascii_lowercase
  assert len(set(alphabet)) == 65
  paragraphs = [f'SPEAKER {"ABCDEFG"[i % 7]}:\n' + ' '.join(alphabet[(i * 7 + j) % 65] * 3 for j in range(40))
                for i in range(300)]
  path.write_text('\n\n'.join(paragraphs) + '\n' + alphabet)
  return str(path)


@pytest.mark.slow
def test_nanogpt_cpu_documented_commands_train(tmp_path, monkeypatch, capsys):
  """The docstring's two commands (paths moved to tmp_path) make a 68-token char tokenizer and train."""
  import sys
  from fmjax import train
  from fmjax.data import builders
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import train_tokenizer  # pylint: disable=import-outside-toplevel
  commands = _documented_commands()['nanogpt_cpu.py']
  assert [c[:3] for c in commands] == [['python', 'tools/train_tokenizer.py', '--model-type'],
                                       ['python', '-m', 'fmjax.train']]
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'data' / 'tinyshakespeare').mkdir(parents=True)
  (tmp_path / 'configs').symlink_to(os.path.join(ROOT, 'configs'))
  _shakespeare_like(tmp_path / 'data' / 'tinyshakespeare' / 'input.txt')
  assert train_tokenizer.main(commands[0][2:]) == 0
  assert 'vocab 68' in capsys.readouterr().out
  argv = commands[1][3:] + ['--config.steps=2', f'--config.data.cache_dir={tmp_path}/cache',
                            '--config.progress_bar=false', '--config.cpu_peak_flops=1e11',
                            '--config.mesh.data=4', '--config.mesh.tensor=2']   # the tests' 8 CPU devices
  args, overrides = _train_parse(argv)
  cfg = cli.load_run_config(args.config, args.workdir, overrides)
  assert (cfg.data.source, cfg.data.split_by, cfg.model.vocab_size) == ('text', 'paragraph', 68)
  assert len(builders.open_split(cfg.data, 'validation')) > 0      # a non-empty validation split
  assert train.main(argv) == 0, capsys.readouterr().err
  assert os.path.exists(os.path.join(cfg.workdir, 'tokenizer.model'))


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


def _train_parse(argv):
  parser = cli.ArgumentParser(prog='fmjax.train')
  cli.add_config_flags(parser)
  cli.add_workdir_flags(parser, required=False, checkpoint=False)
  return cli.parse(parser, argv)


def test_missing_data_path_is_one_clear_line(tmp_path, capsys):
  code = main(['--config', DEFAULT, '--workdir', str(tmp_path / 'w'), '--config.data.source=text',
               f'--config.data.files={tmp_path}/nothing/*.txt'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith('fmjax.train: error:') and 'nothing/*.txt' in err and '\n' not in err, err
