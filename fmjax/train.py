"""Pretrain a language model: `python -m fmjax.train --config configs/default.py --workdir DIR`.

Any config field can be overridden: `--config.model.num_layers=2 --config.steps=100`.
Rerunning with the same workdir resumes from its latest complete checkpoint. One run at a time
holds a workdir (fmjax/checkpoints/lock.py). On resume the changes from the saved config.json are
printed, and run-defining ones (model, steps, schedule, seed, data, batch, seq_len) are refused
unless `--config.allow_config_change=true`; the check comes before config.json is rewritten.
`--init-from CHECKPOINT` starts from a checkpoint's parameters (e.g. one imported by fmjax-convert
from-hf): its metadata defines the model and the tokenizer (restore.adopt_model).
"""

from __future__ import annotations

import sys
from typing import Sequence

from fmjax import cli

USAGE = 'python -m fmjax.train --config CONFIG --workdir DIR [--init-from CHECKPOINT] [--config.KEY=VALUE ...]'
DESCRIPTION = """Pretrain a Transformer language model: a decoder (next-token loss) or an encoder (masked-LM
loss, model.kind=encoder, e.g. --config encoder_default). Every field of the config can be
overridden with --config.a.b=value (e.g. --config.model.num_layers=2 --config.steps=200). Rerunning
with the same --workdir resumes from the latest complete checkpoint there (changing run-defining
options such as the model, steps or learning-rate schedule then needs
--config.allow_config_change=true)."""


def train(cfg, init_from: str | None = None, overrides: Sequence[str] | None = None) -> 'loop.LoopResult':
  """Pretrain per `cfg` (resolved); returns the loop result (final state, logged history).

  `init_from`: start from that checkpoint's parameters, with its model and tokenizer; `overrides` are the
  command line's items (a `model.KEY` among them contradicting the checkpoint is refused; None: all of cfg.model).
  The lifecycle (lock, checkpoints, resume, writers, loop, Ctrl-C) is fmjax/training/session.py's.
  """
  from fmjax.training import objective, session
  return session.run(cfg, objective.Pretraining(), init_from, overrides)


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.train', usage=USAGE, description=DESCRIPTION)
  cli.add_config_flags(p, examples='default, nanogpt_cpu, gpt2_124m, llama_1b, encoder_default')
  cli.add_workdir_flags(p, required=False, checkpoint=False)
  p.add_argument('--init-from', default=None, metavar='CHECKPOINT',
                 help="start from this checkpoint's parameters, model and tokenizer (a workdir or step dir)")
  return p


def _train_command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)
  cfg = cli.load_run_config(args.config, args.workdir, overrides)
  cli.start_run(cfg)
  train(cfg, args.init_from, overrides)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.train', _train_command, argv)


if __name__ == '__main__':
  sys.exit(main())
