"""Every entry point goes through the one CLI layer: its own --help, huge pages, one-line errors."""

import importlib
import sys

import pytest

from fmjax import cli
from fmjax.runtime import hugepages

# (module with main(), flags its --help must list)
COMMANDS = [
    ('fmjax.train', ['--config', '--workdir']),
    ('fmjax.finetune.run', ['--config', '--workdir', '--demo']),
    ('fmjax.generate', ['--workdir', '--prompt', '--max-new-tokens', '--mesh']),
    ('fmjax.evaluate', ['--workdir', '--split', '--batches']),
    ('fmjax.inspect', ['--workdir', '--prompt', '--out']),
    ('fmjax.bench', ['--config', '--steps', '--sweep', '--out']),
    ('fmjax.plan', ['--config', '--topology', '--devices', '--memory-gib']),
    ('fmjax.convert.cli', ['to-hf', 'from-hf', 'params-only']),
    ('fmjax.curate.cli', ['--config', '--overwrite', '--dry-run']),
    ('fmjax.classify', ['--workdir', '--checkpoint', '--input', '--text', '--out', '--batch-size']),
]


@pytest.mark.parametrize('module, flags', COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_lists_the_commands_own_flags(module, flags, capsys):
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as done:
    main(['--help'])
  assert done.value.code == 0
  text = capsys.readouterr().out
  assert all(flag in text for flag in flags), (module, [f for f in flags if f not in text])


class _Reexec(Exception):
  pass


@pytest.mark.parametrize('module', [c[0] for c in COMMANDS])
def test_every_command_line_reexecs_with_huge_pages_first(module, monkeypatch):
  """Called as a command (argv=None), every entry point re-executes for huge pages before any work."""
  def reexec():
    raise _Reexec()
  monkeypatch.setattr(hugepages, 'reexec_with_hugepages', reexec)
  monkeypatch.setattr(sys, 'argv', [module, '--help'])
  with pytest.raises(_Reexec):
    importlib.import_module(module).main()


@pytest.mark.parametrize('module', [c[0] for c in COMMANDS])
def test_bad_command_line_is_one_line_and_exit_2(module, capsys):
  assert importlib.import_module(module).main(['--no-such-flag']) == 2
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and ': error: ' in err


def test_unknown_flag_is_named(capsys):
  from fmjax import train
  assert train.main(['--config', 'default', '--workdir', 'w', '--no-such-flag']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('fmjax.train: error: ') and '--no-such-flag' in err and '\n' not in err


def test_overrides_take_both_forms_and_a_missing_value_is_an_error():
  parser = cli.ArgumentParser(prog='x')
  cli.add_config_flags(parser)
  args, overrides = cli.parse(parser, ['--config', 'c.py', '--config.a.b=1', '--config.c', '2'])
  assert args.config == 'c.py' and overrides == ['a.b=1', 'c=2']
  with pytest.raises(cli.UsageError, match='needs a value'):
    cli.parse(parser, ['--config', 'c.py', '--config.c'])


def test_shipped_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name in ('default', 'default.py', 'configs/default.py', 'llama_1b'):
    assert cli.config_path(name).endswith(('fmjax/configs/default.py', 'fmjax/configs/llama_1b.py'))
  with pytest.raises(Exception, match='shipped configs: .*default'):
    cli.config_path('no_such_config')
