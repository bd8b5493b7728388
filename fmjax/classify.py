"""`python -m fmjax.classify` and `fmjax-classify`: the command line of fmjax/inference/classify.py.

Flags are parsed here, without jax; the classifier is imported after parsing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = """python -m fmjax.classify --workdir FT [--checkpoint best|last|STEP]
       (--input FILE | --text TEXT [--text TEXT ...]) [--out FILE] [--batch-size N] [--config.KEY=VALUE ...]"""
DESCRIPTION = """Labels and class probabilities for new text from a classification fine-tune in FT (its config,
tokenizer and class names come from there), as JSONL to --out or stdout; with labels in --input,
the metrics and a confusion matrix too."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.classify', usage=USAGE, description=DESCRIPTION)
  cli.add_workdir_flags(p, checkpoint=False)
  p.add_argument('--checkpoint', default='best', metavar='best|last|STEP',
                 help='best (WORKDIR/best, the default), last (newest in WORKDIR/checkpoints) or a step there')
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument('--input', metavar='FILE', help='a .jsonl or .csv file of texts (and optionally labels)')
  source.add_argument('--text', action='append', metavar='TEXT', help='a text to classify (repeatable)')
  p.add_argument('--text-field', default=None, help="--input's text column (default: the fine-tune's "
                 'finetune.text_feature)')
  p.add_argument('--label-field', default=None, help="--input's label column (default: the fine-tune's "
                 'finetune.label_feature; used when every row has one)')
  p.add_argument('--out', default=None, metavar='FILE',
                 help='write the predictions JSONL here (and, with labels, FILE.metrics.json and '
                      'FILE.confusion.png beside it); default: print the JSONL')
  p.add_argument('--batch-size', type=int, default=None, metavar='N', help="rows per batch (default: the "
                 "fine-tune's global_batch_size; a multiple of the batch shards)")
  p.add_argument('--mesh', default=None, metavar='D,F,T',
                 help='data,fsdp,tensor mesh shape, e.g. 1,-1,1 (-1: the remaining devices)')
  return p


def _command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  if args.batch_size is not None and args.batch_size < 1:
    raise cli.UsageError(f'--batch-size {args.batch_size} must be positive')
  if args.checkpoint not in ('best', 'last') and not args.checkpoint.isdigit():
    raise cli.UsageError(f'--checkpoint {args.checkpoint!r} is not best, last or a step number')
  from fmjax.inference import classify  # pylint: disable=import-outside-toplevel
  return classify.run_command(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.classify', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
