"""Train a SentencePiece tokenizer that round-trips text exactly.

  python tools/train_tokenizer.py --input 'corpus/**/*.txt' --vocab-size 8000 \
      --model-type bpe --output tokenizer.model

Then train with --config.data.tokenizer=tokenizer.model --config.model.vocab_size=8000.
"""

from __future__ import annotations

import argparse
import sys

from fmjax.data.documents import resolve_files
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import train_sentencepiece


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input', required=True, help="glob of UTF-8 text files ('**' recurses; quote it)")
  parser.add_argument('--vocab-size', type=int, required=True, help='number of tokens, >= 300')
  parser.add_argument('--model-type', choices=('bpe', 'unigram'), default='bpe',
                      help='bpe (fast) or unigram (default: bpe)')
  parser.add_argument('--output', required=True, help='path of the .model file to write')
  parser.add_argument('--max-sentences', type=int, default=2_000_000,
                      help='lines sampled for training (default: 2000000)')
  args = parser.parse_args(argv)
  if not args.output.endswith('.model'):
    parser.error(f'--output {args.output!r} should end in .model')
  try:
    files = resolve_files(args.input, what='--input')
    path = train_sentencepiece(files, args.vocab_size, args.model_type, args.output, args.max_sentences)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {path} ({args.vocab_size} tokens, {args.model_type}, from {len(files)} files)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
