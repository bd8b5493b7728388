"""Train a tokenizer that round-trips text exactly: SentencePiece (bpe, unigram) or characters.

  python tools/train_tokenizer.py --input 'corpus/**/*.txt' --vocab-size 8000 \
      --model-type bpe --out tokenizer.model
  python tools/train_tokenizer.py --input 'shards/*.jsonl.zst' --field text --max-documents 200000 \
      --vocab-size 32000 --out tokenizer.model
  python tools/train_tokenizer.py --mixture 'web:0.7:web/*.parquet,code:0.3:code/*.jsonl.gz' \
      --max-documents 100000 --vocab-size 32000 --out tokenizer.model
  python tools/train_tokenizer.py --model-type char --input input.txt --out chars.json

Inputs are read like pretraining data: text, JSONL (--field) or Parquet (--field is the column),
plain or .gz/.zst compressed, the kind taken from each file's name unless --source says it.
Documents are sampled by document (an even share of --max-documents from each file, files in a
seeded order); lines longer than SentencePiece's 16 KiB limit are split at whitespace (counted in
the summary) rather than skipped. Then train with --config.data.tokenizer=tokenizer.model
--config.model.vocab_size=8000, or --config.data.tokenizer=chars.json --config.model.vocab_size=N+3
for N characters (printed).
"""

from __future__ import annotations

import argparse
import os
import sys

from fmjax import cli
from fmjax.data import tokenizer_inputs
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import CharTokenizer, train_sentencepiece


def _train_char(texts, out: str) -> CharTokenizer:
  chars = set()
  for text in texts:
    chars.update(text)
  if not chars:
    raise DataError('the tokenizer inputs are empty: give files with text')
  tok = CharTokenizer(''.join(chars), out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f'{out}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(tok.to_json().encode('utf-8'))
  os.replace(tmp, out)
  return tok


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog='train_tokenizer.py', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input', default='', help="glob of input files ('**' recurses; quote it)")
  parser.add_argument('--mixture', default='', help="weighted globs as data.mixture: 'a:0.7:GLOB,b:0.3:GLOB'")
  parser.add_argument('--source', choices=('auto', 'text', 'jsonl', 'parquet'), default='auto',
                      help='the file kind (default: from each name: .jsonl/.json -> jsonl, .parquet, else text)')
  parser.add_argument('--field', default='text', help='JSONL field / Parquet column holding the text')
  parser.add_argument('--split-by', choices=('file', 'paragraph'), default='file',
                      help='text files: one document per file or per paragraph (for sampling)')
  parser.add_argument('--max-documents', type=int, default=0, help='documents sampled (0 = all; default)')
  parser.add_argument('--seed', type=int, default=0, help='the order files are sampled in')
  parser.add_argument('--vocab-size', type=int, default=None,
                      help='number of tokens, >= 300 (bpe/unigram; char: the characters found + 3)')
  parser.add_argument('--model-type', choices=('bpe', 'unigram', 'char'), default='bpe',
                      help='bpe (fast), unigram, or char: one token per character of the input (default: bpe)')
  parser.add_argument('--out', required=True, help='path to write: a .model file (bpe/unigram) or .json (char)')
  parser.add_argument('--max-sentences', type=int, default=2_000_000,
                      help='lines SentencePiece samples from the documents (bpe/unigram; default: 2000000)')
  return parser


def _command(argv) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  char = args.model_type == 'char'
  suffix = '.json' if char else '.model'
  if not args.out.endswith(suffix):
    parser.error(f'--out {args.out!r} should end in {suffix} for --model-type {args.model_type}')
  if char and args.vocab_size is not None:
    parser.error('--vocab-size does not apply to --model-type char: the vocabulary is the characters of --input + 3')
  if not char and args.vocab_size is None:
    parser.error(f'--vocab-size is required for --model-type {args.model_type}')
  if bool(args.input) == bool(args.mixture):
    parser.error('give --input GLOB or --mixture SOURCES (one of them)')
  if args.max_documents < 0:
    parser.error('--max-documents must be >= 0')
  docs = tokenizer_inputs.sample_documents(
      args.mixture or args.input, kind=args.source, field=args.field, split_by=args.split_by,
      max_documents=args.max_documents, seed=args.seed, is_mixture=bool(args.mixture))
  if char:
    stats = tokenizer_inputs.LineStats()
    tok = _train_char(_counted(docs, stats), args.out)
    print(f'wrote {args.out} ({len(tok.chars)} characters + pad/bos/eos = vocab {tok.vocab_size}, from '
          f'{stats.documents} documents); train with --config.data.tokenizer={args.out} '
          f'--config.model.vocab_size={tok.vocab_size}')
    return 0
  stats = tokenizer_inputs.LineStats()
  path = train_sentencepiece(tokenizer_inputs.training_lines(docs, stats), args.vocab_size, args.model_type,
                             args.out, args.max_sentences)
  print(f'wrote {path} ({args.vocab_size} tokens, {args.model_type}, from {stats.documents} documents, '
        f'{stats.lines} lines; {stats.split_lines} lines over 16 KiB were split into {stats.pieces} pieces, '
        'none skipped)')
  return 0


def _counted(docs, stats):
  for doc in docs:
    stats.documents += 1
    yield doc


def main(argv=None) -> int:
  return cli.run('train_tokenizer.py', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
