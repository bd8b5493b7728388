"""`python -m fmjax.plan` and `fmjax-plan`: the command line of fmjax/perf/plan.py.

Flags are parsed here, without jax: the plan must choose the devices to compile for before jax starts.
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = """python -m fmjax.plan --config CONFIG [--config.KEY=VALUE ...] [--topology NAME | --devices N]
                         [--num-slices S] [--memory-gib G] [--mfu 0.5] [--context-baseline]"""
DESCRIPTION = """Plan a run before paying for it: compile CONFIG's real train step ahead of time for the target
devices and print, per device, parameter, optimizer-state and activation memory against the device
memory, the FLOPs per step and the step time predicted at --mfu. The target is --topology, else
--devices N of this platform, else the slice the config is sized for (config.topology, e.g. v5p-8
for llama_1b). TPU topologies compile with libtpu installed (no TPU needed); other targets compile
for fake CPU devices of the same count."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.plan', usage=USAGE, description=DESCRIPTION)
  cli.add_config_flags(p, examples='llama_1b, llama_7b')
  p.add_argument('--topology', default='', metavar='NAME',
                 help="e.g. v5p-32, v6e-16, v5litepod-8, v4-8, h100-8 (default: the config's topology; "
                      'without one, the devices of this machine)')
  p.add_argument('--devices', type=int, default=0, metavar='N',
                 help='plan for N devices of this platform (default: see --topology)')
  p.add_argument('--num-slices', type=int, default=0, metavar='S',
                 help='compile for S slices of --topology joined by the data-centre network (TPU multislice; '
                      'mesh.dcn.* spans them; default: config.num_slices)')
  p.add_argument('--context-baseline', action='store_true',
                 help='with mesh.sequence > 1, also compile without the context axis (folded into fsdp) and '
                      'print its activation memory beside this plan')
  p.add_argument('--memory-gib', type=float, default=0.0, metavar='G',
                 help="device memory limit (default: the target chip's)")
  p.add_argument('--mfu', type=float, default=0.5, help='MFU assumed for the predicted step time')
  p.add_argument('--tpu-topology-name', default='', metavar='LAYOUT',
                 help='libtpu chip layout, e.g. v5p:2x2x4 (default: known for the common slices)')
  return p


def _command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  from fmjax.perf import plan  # pylint: disable=import-outside-toplevel
  return plan.run_command(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.plan', _command, argv)


if __name__ == '__main__':
  sys.exit(main())
