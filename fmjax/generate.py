"""`python -m fmjax.generate` and `fmjax-generate`: the command line of fmjax/inference/generate.py.

Flags are parsed here, without jax; the decoding is imported after parsing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = ('python -m fmjax.generate --workdir DIR (--prompt TEXT ... | --prompt-file FILE) [options] '
         '[--config.KEY=VALUE ...]')
DESCRIPTION = """Generate text from the newest checkpoint in DIR (or --step N): the prompts are decoded together
with a KV cache on the training mesh, greedily unless --temperature, --top-k or --top-p ask for
sampling."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.generate', usage=USAGE, description=DESCRIPTION)
  cli.add_workdir_flags(p)
  p.add_argument('--prompt', action='append', metavar='TEXT', help='a prompt (repeatable)')
  p.add_argument('--prompt-file', default=None, metavar='FILE', help='a file with one prompt per line')
  p.add_argument('--max-new-tokens', type=int, default=64, metavar='N',
                 help='tokens to generate per prompt (fewer when the context is full)')
  p.add_argument('--temperature', type=float, default=None, metavar='T',
                 help='0 = greedy; >0 samples (default: 0, or 1 with --top-k / --top-p)')
  p.add_argument('--top-k', type=int, default=0, metavar='K', help='sample from the k likeliest tokens (0 = off)')
  p.add_argument('--top-p', type=float, default=1.0, metavar='P', help='nucleus sampling mass (1 = off)')
  p.add_argument('--seed', type=int, default=0, help='sampling seed')
  p.add_argument('--stop', action='append', default=[], metavar='STRING',
                 help='cut completions at this string (repeatable)')
  p.add_argument('--chat', action='store_true',
                 help="each prompt is a user message, rendered with the checkpoint's chat template (the fine-tune's "
                      "finetune.chat_template, else the tokenizer's, else the built-in); decoding stops at the end "
                      'of the assistant turn')
  p.add_argument('--system', default=None, metavar='TEXT', help='with --chat: a system message before each prompt')
  return p


def _command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  from fmjax.inference import generate  # pylint: disable=import-outside-toplevel
  return generate.run_command(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.generate', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
