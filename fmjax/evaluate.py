"""`python -m fmjax.evaluate` and `fmjax-evaluate`: the command line of fmjax/inference/evaluate.py.

Flags are parsed here, without jax; the evaluation is imported after parsing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = 'python -m fmjax.evaluate --workdir DIR [--split SPLIT] [--batches N] [--config.data.KEY=VALUE ...]'
DESCRIPTION = """Loss, perplexity and bits per byte of the newest checkpoint in DIR (or --step N) on a split of
its data (the saved config's data section; override it with --config.data.*), sharded like training."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.evaluate', usage=USAGE, description=DESCRIPTION)
  cli.add_workdir_flags(p)
  p.add_argument('--split', default=None, help="the split to evaluate (default: the saved config's data.eval_split)")
  p.add_argument('--batches', type=int, default=None, metavar='N',
                 help="number of batches (default: the saved config's eval_batches)")
  return p


def _command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  from fmjax.inference import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.run_command(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.evaluate', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
