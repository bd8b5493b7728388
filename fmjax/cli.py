"""The command-line layer of every fmjax entry point: flags, overrides, errors, huge pages, logging.

Each command builds an `ArgumentParser` with its own flags (so `--help` lists them), adds the
shared ones (`add_config_flags`, `add_workdir_flags`) and hands its body to `run`, which
re-executes the process once with huge pages for malloc (fmjax/runtime/hugepages.py, every command the
same), chooses JAX's platforms (fmjax/runtime/platforms.py), sets up logging and turns any
`fmjax.errors.UserError` into one line and exit code 2. A command's parser is built in a module that
imports nothing heavy, and jax and the command's work are imported after parsing: `--help` and usage
errors never start JAX.

Config overrides are `--config.a.b=value` or `--config.a.b value`, parsed here and only here and
applied by `fmjax.config` (which checks keys and types). ml_collections' `config_flags` is not
used: it needs absl's global flag registry, and its errors are multi-line absl usage dumps.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Callable, Sequence

from fmjax.runtime import hugepages
from fmjax.runtime import platforms
from fmjax.errors import UserError

_PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


class UsageError(UserError):
  """A bad command line."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """--help as written: the description's line breaks kept, each flag's default shown where it has one."""

  def _get_help_string(self, action):
    text = action.help or ''
    default = action.default
    if ('default' in text or default is None or default is False or default == '' or default == []
        or default is argparse.SUPPRESS or not action.option_strings):
      return text
    return f'{text} (default: %(default)s)' if text else '(default: %(default)s)'


class ArgumentParser(argparse.ArgumentParser):
  """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting.

  Build it from light modules only (no jax): `--help` is answered before anything heavy is imported.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise UsageError(f'{message} (see --help)')


def add_config_flags(parser: argparse.ArgumentParser, required: bool = True,
                     examples: str = 'default, llama_1b', note: str = '') -> None:
  """--config FILE (plus --config.KEY=VALUE overrides, documented in the help); `examples`: shipped
  configs that suit the command; `note`: appended to the help."""
  parser.add_argument('--config', required=required, metavar='CONFIG',
                      help=f'a get_config() Python file, or the name of a shipped config (e.g. {examples}); '
                           f'override any field with --config.KEY=VALUE{note}')


def add_workdir_flags(parser: argparse.ArgumentParser, required: bool = True, checkpoint: bool = True) -> None:
  """--workdir (and, for tools that read a trained workdir, --step and --mesh)."""
  parser.add_argument('--workdir', required=required, metavar='DIR',
                      help='the run directory (checkpoints, logs, config.json)')
  if checkpoint:
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the newest)')
    parser.add_argument('--mesh', default=None, metavar='D,F,T',
                        help='data,fsdp,tensor mesh shape, e.g. 1,-1,1 (-1: the remaining devices)')


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(args, ['a.b=value', ...]): the command's own flags and the `--config.*` overrides."""
  args, rest = parser.parse_known_args(list(argv))
  overrides, i = [], 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith('--config.'):
      raise UsageError(f'unrecognised argument {item!r}; overrides look like --config.key=value')
    if '=' not in item:
      if i + 1 >= len(rest) or rest[i + 1].startswith('--'):
        raise UsageError(f'{item} needs a value: {item}=VALUE')
      item, i = f'{item}={rest[i + 1]}', i + 1
    overrides.append(item[len('--config.'):])
    i += 1
  return args, overrides


def config_path(name: str) -> str:
  """A config file path: as given if it exists, else a config shipped in the package by name.

  'default', 'default.py' and 'configs/default.py' all find fmjax/configs/default.py, so the
  commands in README work from any directory after a plain `pip install`.
  """
  path = os.path.expanduser(name)
  if os.path.isfile(path):
    return path
  base = os.path.basename(path)
  shipped = os.path.join(_PACKAGE_CONFIGS, base if base.endswith('.py') else base + '.py')
  if os.path.isfile(shipped):
    return shipped
  from fmjax.config import ConfigError  # pylint: disable=import-outside-toplevel
  names = sorted(f[:-3] for f in os.listdir(_PACKAGE_CONFIGS) if f.endswith('.py') and not f.startswith('_')) \
      if os.path.isdir(_PACKAGE_CONFIGS) else []
  raise ConfigError(f'config file not found: {name} (shipped configs: {", ".join(names)})')


def load_run_config(config: str, workdir: str | None, overrides: Sequence[str]):
  """The resolved run config of a training command; `--workdir` wins over `config.workdir`."""
  from fmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.resolve(config_path(config), overrides)
  if workdir:
    cfg.workdir = workdir
  if not cfg.workdir:
    raise config_lib.ConfigError('no workdir: pass --workdir DIR')
  from fmjax.runtime import paths  # pylint: disable=import-outside-toplevel
  cfg.workdir = paths.resolve(cfg.workdir)   # local: absolute; gs://...: as given
  return cfg


def start_run(cfg) -> None:
  """Before JAX starts its backend: the GPU XLA flags of `cfg`, then the multi-process runtime."""
  from fmjax.runtime import distributed  # pylint: disable=import-outside-toplevel
  from fmjax.runtime import gpu_flags
  gpu_flags.apply(cfg)
  distributed.initialize()


@contextlib.contextmanager
def command_logging():
  """While a command runs: fmjax's INFO logs on stdout (with the run's other progress lines), its
  warnings on stderr, each once; other libraries' warnings as Python prints them. The logger is
  restored afterwards (commands called from Python, e.g. in tests, leave no handlers behind)."""
  log = logging.getLogger('fmjax')
  saved = (log.level, log.propagate)
  info = logging.StreamHandler(sys.stdout)
  info.addFilter(lambda record: record.levelno < logging.WARNING)
  warnings = logging.StreamHandler(sys.stderr)
  warnings.setLevel(logging.WARNING)
  for handler in (info, warnings):
    handler.setFormatter(logging.Formatter('%(name)s: %(message)s'))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  try:
    yield
  finally:
    for handler in (info, warnings):
      log.removeHandler(handler)
    log.setLevel(saved[0])
    log.propagate = saved[1]


def run(prog: str, body: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
  """Run a command's `body(argv)`; a UserError becomes `prog: error: ...` and exit code 2.

  Called with argv=None (the real command line), it first re-executes the process once with
  huge pages for malloc (a no-op where unsupported or `FMJAX_HUGEPAGES=0`). Then JAX's platforms are
  chosen (`platforms.choose`: the user's JAX_PLATFORMS wins; off TPU hosts libtpu is not loaded).
  """
  if argv is None:
    hugepages.reexec_with_hugepages()
    argv = sys.argv[1:]
  platforms.choose()   # before anything imports jax: no libtpu off TPU hosts (fmjax/runtime/platforms.py)
  try:
    with command_logging():
      code = body(list(argv))
  except UserError as e:
    print(f'{prog}: error: {e}', file=sys.stderr, flush=True)
    return 2
  return 0 if code is None else int(code)
