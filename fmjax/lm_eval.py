"""`python -m fmjax.lm_eval` and `fmjax-lm-eval`: lm-evaluation-harness tasks on an fmjax checkpoint.

Flags are parsed here, without jax or lm-eval; the run is fmjax/inference/lm_eval_run.py and the model
behind it fmjax/inference/lm_eval_backend.py (registered with lm-eval as 'fmjax').
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = ('python -m fmjax.lm_eval --workdir DIR --tasks NAME[,NAME...] [--num-fewshot N] [--limit N] '
         '[--include-path TASKDIR] [--batch-size N] [--out results.json] [--config.KEY=VALUE ...]')
DESCRIPTION = """Evaluate the newest checkpoint in DIR (or --step N; a trained workdir or one imported with
fmjax-convert from-hf) on lm-eval tasks, with the checkpoint's tokenizer, sharded on its mesh.
Tasks: fmjax's offline sanity tasks (fmjax_sanity = fmjax_stdlib_next_line, fmjax_stdlib_last_word,
fmjax_stdlib_last_word_gen, fmjax_stdlib_perplexity: held-out standard-library code, not benchmarks),
task YAML files in --include-path folders (e.g. dataset_path: json over local files), or lm-eval's own
tasks (their datasets come from the Hugging Face hub or its cache; offline, set HF_DATASETS_OFFLINE=1
HF_HUB_OFFLINE=1). Prints lm-eval's table and writes its results JSON at --out (default
DIR/lm_eval/results_step<N>.json) and every sample, with its log-likelihoods or generation, as JSONL
beside it (<out>.samples.jsonl). Needs pip install "fmjax[eval]"."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.lm_eval', usage=USAGE, description=DESCRIPTION)
  cli.add_workdir_flags(p)
  p.add_argument('--tasks', required=True, metavar='A,B', help='comma-separated task, group or tag names')
  p.add_argument('--num-fewshot', type=int, default=None, metavar='N', help='few-shot examples (default: the task\'s)')
  p.add_argument('--limit', type=float, default=None, metavar='N',
                 help='documents per task (a fraction when below 1; for quick checks, not reportable scores)')
  p.add_argument('--include-path', action='append', default=[], metavar='TASKDIR',
                 help='a folder of task YAML files (repeatable)')
  p.add_argument('--batch-size', type=int, default=16, metavar='N', help='requests per device batch')
  p.add_argument('--max-length', type=int, default=None, metavar='N',
                 help='tokens per request at most (default: the model context); longer ones are cut from the left')
  p.add_argument('--no-buckets', action='store_true',
                 help='pad each batch to its own longest request instead of a few bucket lengths (more compiles)')
  p.add_argument('--dtype', default=None, metavar='DTYPE',
                 help='compute dtype, e.g. float32 (default: the checkpoint\'s)')
  p.add_argument('--gen-kwargs', default=None, metavar='K=V,...',
                 help='generation options for generate_until tasks, e.g. max_gen_toks=32,until=\\n')
  p.add_argument('--bootstrap-iters', type=int, default=1000, metavar='N',
                 help='bootstrap resamples for standard errors (0: none)')
  p.add_argument('--seed', type=int, default=0, help='sampling seed (generation with do_sample)')
  p.add_argument('--out', default=None, metavar='FILE', help='results JSON path (samples go beside it)')
  return p


def _command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  from fmjax.inference import lm_eval_run  # pylint: disable=import-outside-toplevel
  return lm_eval_run.run_command(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.lm_eval', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
