"""`python -m fmjax.inspect` and `fmjax-inspect`: the command line of fmjax/inference/inspect.py.

Flags are parsed here, without jax; the model is imported after parsing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = 'python -m fmjax.inspect --workdir DIR --prompt TEXT --out OUT [--top-k K] [--step N] [--mesh D,F,T]'
DESCRIPTION = """Look inside the newest checkpoint in DIR (or --step N): attention maps of every layer and head,
a logit lens (each layer's top next-token guesses) and the per-token loss of TEXT, written to OUT as
PNG images (attention_layer<i>.png, logit_lens.png, token_loss.png) and inspect.json."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.inspect', usage=USAGE, description=DESCRIPTION)
  cli.add_workdir_flags(p)
  p.add_argument('--prompt', required=True, metavar='TEXT', help='the text to inspect')
  p.add_argument('--out', required=True, metavar='OUT', help='directory for the PNG and JSON files')
  p.add_argument('--top-k', type=int, default=5, metavar='K', help='tokens per position in the logit lens')
  return p


def _command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  if args.top_k <= 0:
    raise cli.UsageError(f'--top-k {args.top_k} must be positive')
  from fmjax.inference import inspect  # pylint: disable=import-outside-toplevel
  return inspect.run_command(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.inspect', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
