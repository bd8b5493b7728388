"""Train a tokenizer that round-trips text exactly: SentencePiece (bpe, unigram) or characters.

  python tools/train_tokenizer.py --input 'corpus/**/*.txt' --vocab-size 8000 \
      --model-type bpe --out tokenizer.model
  python tools/train_tokenizer.py --model-type char --input input.txt --out chars.json

Then train with --config.data.tokenizer=tokenizer.model --config.model.vocab_size=8000, or
--config.data.tokenizer=chars.json --config.model.vocab_size=N+3 for N characters (printed).
"""

from __future__ import annotations

import argparse
import sys

from fmjax import cli
from fmjax.data.documents import resolve_files
from fmjax.data.tokenizers import train_char, train_sentencepiece


def _command(argv) -> int:
  parser = cli.ArgumentParser(prog='train_tokenizer.py', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input', required=True, help="glob of UTF-8 text files ('**' recurses; quote it)")
  parser.add_argument('--vocab-size', type=int, default=None,
                      help='number of tokens, >= 300 (bpe/unigram; char: the characters found + 3)')
  parser.add_argument('--model-type', choices=('bpe', 'unigram', 'char'), default='bpe',
                      help='bpe (fast), unigram, or char: one token per character of the input (default: bpe)')
  parser.add_argument('--out', required=True, help='path to write: a .model file (bpe/unigram) or .json (char)')
  parser.add_argument('--max-sentences', type=int, default=2_000_000,
                      help='lines sampled for training (bpe/unigram; default: 2000000)')
  args = parser.parse_args(argv)
  char = args.model_type == 'char'
  suffix = '.json' if char else '.model'
  if not args.out.endswith(suffix):
    parser.error(f'--out {args.out!r} should end in {suffix} for --model-type {args.model_type}')
  if char and args.vocab_size is not None:
    parser.error('--vocab-size does not apply to --model-type char: the vocabulary is the characters of --input + 3')
  if not char and args.vocab_size is None:
    parser.error(f'--vocab-size is required for --model-type {args.model_type}')
  files = resolve_files(args.input, what='--input')
  if char:
    tok = train_char(files, args.out)
    print(f'wrote {args.out} ({len(tok.chars)} characters + pad/bos/eos = vocab {tok.vocab_size}, from '
          f'{len(files)} files); train with --config.data.tokenizer={args.out} '
          f'--config.model.vocab_size={tok.vocab_size}')
    return 0
  path = train_sentencepiece(files, args.vocab_size, args.model_type, args.out, args.max_sentences)
  print(f'wrote {path} ({args.vocab_size} tokens, {args.model_type}, from {len(files)} files)')
  return 0


def main(argv=None) -> int:
  return cli.run('train_tokenizer.py', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
