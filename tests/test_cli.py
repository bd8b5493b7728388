"""Every entry point goes through the one CLI layer: its own --help (instant, without jax), huge pages,
one-line errors."""

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

from fmjax import cli
from fmjax.runtime import hugepages
from fmjax.runtime import platforms

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
    ('fmjax.lm_eval', ['--workdir', '--tasks', '--num-fewshot', '--limit', '--include-path', '--batch-size',
                       '--out']),
]


# `python -m NAME` of each command above
RUN_AS = {'fmjax.finetune.run': 'fmjax.finetune', 'fmjax.convert.cli': 'fmjax.convert',
          'fmjax.curate.cli': 'fmjax.curate'}


def _help(module, capsys) -> str:
  with pytest.raises(SystemExit) as done:
    importlib.import_module(module).main(['--help'])
  assert done.value.code == 0
  return capsys.readouterr().out


@pytest.mark.parametrize('module, flags', COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_lists_the_commands_own_flags(module, flags, capsys):
  text = _help(module, capsys)
  assert all(flag in text for flag in flags), (module, [f for f in flags if f not in text])


@pytest.mark.parametrize('module', [c[0] for c in COMMANDS])
def test_help_has_one_description_between_usage_and_flags(module, capsys):
  """usage, then the description once (not also the module docstring's first line), then the flags."""
  blocks = [b for b in _help(module, capsys).split('\n\n') if b.strip()]
  assert blocks[0].startswith('usage: ')
  flags = next(i for i, b in enumerate(blocks) if b.startswith(('options:', 'positional arguments:')))
  assert flags == 2, blocks[:flags]
  description = blocks[1]
  assert description.count('`') % 2 == 0, description   # no sentence cut off inside a `code` span


def test_help_says_what_the_command_does_and_which_configs_suit_it(capsys):
  finetune = _help('fmjax.finetune.run', capsys)
  assert 'finetune_stdlib' in finetune.split('options:')[1] and 'llama_1b' not in finetune
  curate = _help('fmjax.curate.cli', capsys)
  assert 'curate_default' in curate.split('options:')[1] and 'llama_1b' not in curate
  plan = _help('fmjax.plan', capsys)
  assert 'llama_1b' in plan.split('options:')[1] and "the config's topology" in plan
  assert '(default: this machine)' not in plan
  assert 'nanogpt_cpu' in _help('fmjax.bench', capsys).split('options:')[1]
  train = _help('fmjax.train', capsys)
  assert 'decoder-only' not in train and 'encoder' in train


def test_help_shows_defaults(capsys):
  generate = ' '.join(_help('fmjax.generate', capsys).split())
  assert '--max-new-tokens N tokens to generate per prompt (fewer when the context is full) (default: 64)' in generate
  assert '(default: 0, or 1 with --top-k / --top-p)' in generate and 'seed (default: 0)' in generate
  bench = ' '.join(_help('fmjax.bench', capsys).split())
  assert '--steps N timed train steps per run (default: 10)' in bench and "(default: 0,1,2)" in bench
  plan = ' '.join(_help('fmjax.plan', capsys).split())
  assert '--mfu MFU MFU assumed for the predicted step time (default: 0.5)' in plan


def test_the_help_formatter_shows_only_real_defaults():
  parser = cli.ArgumentParser(prog='x', description='line one\nline two')
  parser.add_argument('--n', type=int, default=3, help='count')
  parser.add_argument('--none', default=None, help='nothing')
  parser.add_argument('--flag', action='store_true', help='a switch')
  parser.add_argument('--own', default=5, help='five (default: five)')
  parser.add_argument('--empty', default='', help='empty')
  text = parser.format_help()
  assert 'line one\nline two' in text   # the description's line breaks are kept
  assert 'count (default: 3)' in text and 'five (default: five)' in text
  assert text.count('(default:') == 2


def _without_jax_platforms() -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'JAX_PLATFORM_NAME')}
  env['PYTHONPATH'] = os.pathsep.join(p for p in [os.getcwd(), env.get('PYTHONPATH', '')] if p)
  return env


@pytest.mark.parametrize('module', [c[0] for c in COMMANDS])
def test_help_is_fast_and_imports_no_jax(module):
  """`python -m fmjax.<cmd> --help` answers in well under a second (3 s on a shared CPU) without importing jax."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable, '-m', RUN_AS.get(module, module), '--help'], capture_output=True, text=True,
                        env=_without_jax_platforms(), timeout=120)
  seconds = time.perf_counter() - start
  assert done.returncode == 0 and 'usage: ' in done.stdout, done.stderr
  assert seconds < 3, f'{module} --help took {seconds:.1f}s'
  code = (f'import sys\nimport {module} as command\ntry:\n  command.main(["--help"])\nexcept SystemExit as e:\n'
          '  assert e.code == 0\nprint("jax imported:", "jax" in sys.modules)')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=_without_jax_platforms(),
                        timeout=120)
  assert done.stdout.strip().endswith('jax imported: False'), (done.stdout[-300:], done.stderr[-300:])


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
  cli.add_workdir_flags(parser, required=False, checkpoint=False)
  args, overrides = cli.parse(parser, ['--config', 'c.py', '--workdir', 'w', '--config.a.b=1', '--config.c', '2'])
  assert args.config == 'c.py' and args.workdir == 'w' and overrides == ['a.b=1', 'c=2']
  with pytest.raises(cli.UsageError, match='needs a value'):
    cli.parse(parser, ['--config', 'c.py', '--config.c'])


def test_shipped_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name in ('default', 'default.py', 'configs/default.py', 'llama_1b'):
    assert cli.config_path(name).endswith(('fmjax/configs/default.py', 'fmjax/configs/llama_1b.py'))
  with pytest.raises(Exception, match='shipped configs: .*default'):
    cli.config_path('no_such_config')


# ------------------------------------------------------------- JAX's platforms: no libtpu off TPU hosts
_TPU_WORD = re.compile(r'\b(lib)?tpu\b', re.IGNORECASE)
_TPU_VARIABLE = re.compile(r'\bTPU_[A-Z]')   # TPU_WORKER_HOSTNAMES, TPU_ACCELERATOR_TYPE, ...


def _mentions_tpu(line: str) -> bool:
  return bool(_TPU_WORD.search(line) or _TPU_VARIABLE.search(line))


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)


def test_commands_and_the_api_choose_the_platforms_before_jax_starts():
  """cli.run and fmjax.api.load set JAX_PLATFORMS per platforms.choice() before jax is imported; a user's wins."""
  env = _without_jax_platforms()
  expected = platforms.choice(env)
  command = ('import os, sys\nfrom fmjax import cli\n'
             'cli.run("x", lambda argv: print(os.environ.get("JAX_PLATFORMS"), "jax" in sys.modules), [])')
  assert _run_python(command, env).stdout.split() == [str(expected), 'False']
  assert _run_python(command, dict(env, JAX_PLATFORMS='')).stdout.split() == ['False']   # '' (auto) kept as ''
  api = ('import os\nimport fmjax.api\ntry:\n  fmjax.api.load("/no/such/workdir")\nexcept Exception:\n  pass\n'
         'print(os.environ.get("JAX_PLATFORMS"))')
  assert _run_python(api, env).stdout.split() == [str(expected)]


needs_libtpu_off_tpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None or bool(platforms.tpu_host_evidence()),
    reason='needs libtpu installed on a machine that is not a TPU host')


@pytest.mark.slow
@needs_libtpu_off_tpu
def test_no_command_prints_tpu_lines_off_tpu_hosts(tmp_path):
  """Every JAX-using command, run as a user runs it (no JAX_PLATFORMS, libtpu installed): no line about TPUs.
  The same environment without the choice (JAX_PLATFORMS='', JAX's own search) does print libtpu's lines
  on such machines: checked first, so that a machine where libtpu stays silent cannot pass for a fix."""
  from helpers import write_corpus
  env = dict(_without_jax_platforms(), FMJAX_HUGEPAGES='0')
  env.pop('XLA_FLAGS', None)
  tiny = os.path.join(os.getcwd(), 'tests', 'configs', 'tiny.py')
  work = str(tmp_path / 'run')
  data = [f'--config.data.files={write_corpus(tmp_path / "corpus")}', f'--config.data.cache_dir={tmp_path / "cache"}']
  commands = [
      ['fmjax.train', '--config', tiny, '--workdir', work, '--config.steps=2', '--config.checkpoint_every=2',
       '--config.eval_every=0', *data],
      ['fmjax.evaluate', '--workdir', work, '--batches', '1'],
      ['fmjax.generate', '--workdir', work, '--prompt', 'the quick', '--max-new-tokens', '2'],
      ['fmjax.inspect', '--workdir', work, '--prompt', 'the quick', '--out', str(tmp_path / 'inspect')],
      ['fmjax.bench', '--config', tiny, '--steps', '2'],
      ['fmjax.evaluate', '--workdir', str(tmp_path / 'missing')],
      ['fmjax.classify', '--workdir', str(tmp_path / 'missing'), '--text', 'x'],
  ]
  probe = _run_python('import jax\njax.devices()', dict(env, JAX_PLATFORMS=''))
  if not any(_mentions_tpu(line) for line in (probe.stdout + probe.stderr).splitlines()):
    pytest.skip('libtpu prints nothing on this machine even when JAX searches for a TPU')
  for argv in commands:
    done = subprocess.run([sys.executable, '-m', *argv], capture_output=True, text=True, env=env, timeout=900,
                          cwd=os.getcwd())
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == (2 if 'missing' in ' '.join(argv) else 0), (argv, lines[-20:])
    assert not [line for line in lines if _mentions_tpu(line)], (argv, lines[:20])
