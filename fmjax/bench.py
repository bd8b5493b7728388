"""`python -m fmjax.bench` and `fmjax-bench`: the command line of fmjax/perf/bench.py.

Flags are parsed here, without jax; the benchmark is imported after parsing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = """python -m fmjax.bench --config CONFIG [--config.KEY=VALUE ...] [--steps N] [--sweep "KEY=V1,V2,..." | "k=v,k=v;k=v"]
                          [--torch-reference PATH --text FILE] [--out FILE] [--repeats R]
       python -m fmjax.bench --data --config CONFIG [--workers 0,1,2] [--seconds S] [--out FILE]"""
DESCRIPTION = """Benchmark the real compiled train step of CONFIG on synthetic tokens: compile time, median
step time, tokens/s, TFLOP/s per device, MFU and peak memory, one row per --sweep override set (a
row on stderr as each finishes, then the table and JSON on stdout). --data times the config's input
pipeline instead (no model): loader tokens/s for each --workers count."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.bench', usage=USAGE, description=DESCRIPTION)
  cli.add_config_flags(p, examples='nanogpt_cpu, gpt2_124m, llama_1b')
  p.add_argument('--steps', type=int, default=10, metavar='N', help='timed train steps per run')
  p.add_argument('--repeats', type=int, default=1, metavar='R', help='alternate fmjax/reference runs this many times')
  p.add_argument('--sweep', default='', help='override sets to compare: one per value, e.g. optim.name=adamw,muon, or sets separated '
                                         'by ";", e.g. "a=1,b=2;a=3" (default: the config as is)')
  p.add_argument('--torch-reference', default='', metavar='PATH', help='a PyTorch baseline script')
  p.add_argument('--text', default='', metavar='FILE', help='training text for the PyTorch baseline')
  p.add_argument('--out', default='', metavar='FILE', help='also write the rows as JSON to FILE')
  p.add_argument('--data', action='store_true', help="time the config's input pipeline, not the model")
  p.add_argument('--workers', default='0,1,2', help='--data: data.worker_count values to time')
  p.add_argument('--seconds', type=float, default=10.0, metavar='S', help='--data: seconds timed per worker count')
  return p


def _command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  from fmjax.perf import bench  # pylint: disable=import-outside-toplevel
  return bench.run_command(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.bench', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
