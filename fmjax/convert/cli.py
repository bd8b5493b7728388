"""`fmjax-convert` / `python tools/convert_checkpoint.py`: to-hf, from-hf, params-only."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fmjax import cli

DESCRIPTION = """Convert fmjax checkpoints. Model config, layer layout and tokenizer come from the
checkpoint's metadata; flags may fill in what it lacks, and a flag that contradicts it is an error.
Only safetensors are read or written (no pickles)."""


def _bool(text: str) -> bool:
  low = text.lower()
  if low in ('true', '1', 'yes', 'scanned'):
    return True
  if low in ('false', '0', 'no', 'unrolled'):
    return False
  raise argparse.ArgumentTypeError(f'expected scanned/unrolled (true/false), got {text!r}')


def _source_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument('--workdir', required=True, metavar='DIR',
                 help='fmjax workdir, its checkpoints/ dir, or one checkpoints/<step> dir')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  p.add_argument('--model-config', default=None, help="JSON model config (or a run's config.json) when the "
                 'metadata lacks one')
  p.add_argument('--source-layout', type=_bool, default=None, help='scanned|unrolled, when the metadata lacks it')
  p.add_argument('--tokenizer', default=None, help="'byte' or a SentencePiece .model, when the metadata lacks it")


def _overwrite_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument('--overwrite', action='store_true',
                 help='replace a non-empty --out (its old contents are removed; by default it is refused)')


def _verify_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument('--verify', action='store_true',
                 help='compare logits with transformers in float64 (needs torch)')
  p.add_argument('--max-diff', type=float, default=None,
                 help='--verify fails above this absolute max abs logits diff vs the float64 reference (default '
                      'max(1e-4, 8 x transformers float32 vs float64); bf16 params: a bf16-rounded reference)')
  p.add_argument('--max-kl', type=float, default=None,
                 help='--verify fails above this absolute mean KL (default max(1e-6, 8 x transformers float32 KL))')


def build_parser() -> argparse.ArgumentParser:
  from fmjax.convert import families  # pylint: disable=import-outside-toplevel  (light: no jax)
  parser = cli.ArgumentParser(prog='fmjax-convert', description=DESCRIPTION)
  sub = parser.add_subparsers(dest='command', required=True)
  exports = ', '.join(f'{f.TITLES[0]} as {f.ARCHITECTURE}' for f in families.registered())

  p = sub.add_parser('to-hf', help=f'fmjax checkpoint -> Hugging Face directory ({exports})')
  _source_flags(p)
  p.add_argument('--out', required=True, help='output directory (config.json, safetensors, tokenizer)')
  p.add_argument('--family', choices=families.names(), default=None, help='default: from the model config')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None, help='default: the params dtype')
  p.add_argument('--max-shard-size', default='5GB', help='split safetensors above this size (e.g. 2GB, 500MB)')
  _overwrite_flag(p)
  _verify_flags(p)

  p = sub.add_parser('from-hf', help=f'Hugging Face directory ({", ".join(families.titles())}) -> params-only '
                     'checkpoint')
  p.add_argument('--hf-dir', required=True, metavar='DIR', help='local directory with config.json and *.safetensors')
  p.add_argument('--out', required=True, help='output fmjax workdir (checkpoints/<step>/{state,meta})')
  p.add_argument('--layout', type=_bool, default=None,
                 help='scanned or unrolled layers (default: scanned, unrolled when dense and MoE layers mix)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='param dtype to store')
  p.add_argument('--mesh', default=None, help='data,fsdp,tensor to shard onto (default: one device)')
  p.add_argument('--step', type=int, default=0, help='step number of the written checkpoint')
  p.add_argument('--tokenizer', default=None, help="'byte', a tokenizer.json or a SentencePiece .model to record "
                 'when the HF directory has none (tokenizer.json, vocab.json + merges.txt or tokenizer.model)')
  p.add_argument('--max-seq-len', type=int, default=None,
                 help='lower the context of a RoPE model (default: max_position_embeddings of config.json)')
  _overwrite_flag(p)
  _verify_flags(p)

  p = sub.add_parser('params-only', help='training checkpoint -> params-only (cast, relayout, reshard)')
  _source_flags(p)
  p.add_argument('--out', required=True, help='output fmjax workdir')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None, help='default: keep')
  p.add_argument('--layout', type=_bool, default=None, help='scanned|unrolled (default: keep)')
  p.add_argument('--mesh', default=None, help='data,fsdp,tensor to restore onto and save from (default: 1,1,1)')
  _overwrite_flag(p)
  return parser


def run(args) -> None:
  from fmjax.convert import driver, source, hf_io, verify

  if args.command == 'from-hf':
    check = (lambda hf_dir, out: verify.verify(out['params'], out['model'], hf_dir, args.max_diff, args.max_kl)) \
        if args.verify else None
    driver.from_hf(args.hf_dir, args.out, scan_layers=args.layout, dtype=args.dtype, mesh_spec=args.mesh,
                   step=args.step, tokenizer=args.tokenizer, max_seq_len=args.max_seq_len, overwrite=args.overwrite,
                   check=check)
    return
  src = source.open_source(args.workdir, step=args.step, model_json=args.model_config,
                           scanned=args.source_layout, tokenizer=args.tokenizer)
  if args.command == 'to-hf':
    check = (lambda out_dir, out: verify.verify(out['params'], src.model, out_dir, args.max_diff, args.max_kl)) \
        if args.verify else None
    driver.to_hf(src, args.out, family=args.family, dtype=args.dtype,
                 max_shard_bytes=hf_io.parse_size(args.max_shard_size), overwrite=args.overwrite, check=check)
  else:
    driver.params_only(src, args.out, dtype=args.dtype, scan_layers=args.layout, mesh_spec=args.mesh,
                       overwrite=args.overwrite)


def _convert_command(argv: Sequence[str]) -> int:
  run(build_parser().parse_args(argv))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax-convert', _convert_command, argv)


if __name__ == '__main__':
  sys.exit(main())
