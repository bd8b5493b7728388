"""Fine-tune a pretrained model: `python -m fmjax.finetune --config configs/finetune_TASK.py
--config.init_from=PRETRAIN_WORKDIR --workdir DIR`.

The run is the lifecycle every objective shares (fmjax/training/session.py: lock, checkpoints, resume,
writers, loop) training `FineTuning` (fmjax/finetune/parts.py), whose model is assembled by the
pretraining builder (`fmjax.training.build.build_run` with the fine-tuning task). `--demo` fine-tunes the embedded stdlib task from the checkpoint and from random
initialisation and prints both metric tables.
"""

from __future__ import annotations

import json
from typing import Sequence

from fmjax import cli
from fmjax import config as config_lib
from fmjax.finetune.checks import check_config
from fmjax.runtime import paths

# jax and the training stack are imported inside the functions: `--help` is answered without them.

USAGE = """python -m fmjax.finetune --config CONFIG --config.init_from=PRETRAIN_WORKDIR --workdir DIR
         [--config.KEY=VALUE ...]
       python -m fmjax.finetune --demo [classify|chat] --config.init_from=PRETRAIN_WORKDIR --workdir DIR"""

DESCRIPTION = """Fine-tune a pretrained fmjax checkpoint: classification, continued pretraining, prompt/response
tuning, chat SFT or DPO (finetune.task; the finetune section of the config). --config.init_from is short
for --config.finetune.init_from; the checkpoint defines the model and the tokenizer. --demo (classify)
runs the shipped finetune_stdlib config from the checkpoint and from random initialisation and prints
both metric tables side by side, beside a character n-gram baseline; --demo chat runs SFT then DPO on a
unit-conversion task made in code (configs/finetune_chat.py) and prints held-out exact match per stage."""

DEMO_CONFIG = 'finetune_stdlib'
DEMO_CONFIGS = {'classify': DEMO_CONFIG, 'chat': 'finetune_chat'}


def finetune(cfg, overrides: Sequence[str] | None = None) -> dict:
  """Fine-tune per `cfg` (resolved); returns {'report' (the eval split's, last step), 'best' (best.json),
  'summary' (classify: summary.json, see fmjax/finetune/summary.py), 'history', 'state', 'last_step'}.

  finetune.epochs / warmup_ratio are resolved into cfg.steps / cfg.optim.warmup_steps from the train
  split's size (fmjax/finetune/schedule.py) before config.json is written.

  With finetune.init_from the model section is the checkpoint's (restore.adopt_model): `overrides` are
  the command line's items, and a `model.KEY=VALUE` among them that contradicts the checkpoint is refused;
  with None (a call from Python) every field of cfg.model must agree with the checkpoint.
  """
  from fmjax.finetune.parts import FineTuning
  from fmjax.training import session
  check_config(cfg)
  objective = FineTuning()
  result = session.run(cfg, objective, cfg.finetune.init_from or None, overrides)
  return objective.outcome(result)


def demo(cfg, overrides: Sequence[str] | None = None) -> dict:
  """Fine-tune the same task from cfg.finetune.init_from and from random initialisation; print both beside
  the n-gram baseline (eval split; each model at its best checkpoint, chosen on validation when there is
  one, else at its last step). Each arm is a whole fine-tune workdir of its own: WORKDIR/pretrained/ and
  WORKDIR/random_init/ (config.json, checkpoints, best/, eval reports, summary.json: classify with
  `python -m fmjax.classify --workdir WORKDIR/pretrained`). Writes WORKDIR/demo.json with both tables."""
  from fmjax.checkpoints import restore
  from fmjax.finetune import task_metrics
  from fmjax.runtime import distributed
  if not cfg.finetune.init_from:
    raise config_lib.ConfigError('--demo needs --config.init_from=PRETRAIN_WORKDIR (pretrain one with: python -m '
                                 'fmjax.train --config configs/default.py --workdir W)')
  source, step, _ = restore.locate_checkpoint(cfg.finetune.init_from)
  try:
    meta = source.read_metadata(step)
  finally:
    source.close()
  reports, outcome = {}, None
  for name, init in (('pretrained', cfg.finetune.init_from), ('random init', '')):
    c = cfg.copy_and_resolve_references()
    c.finetune.init_from = init
    if not init:  # the same model as the pretrained one (decoder or encoder), freshly initialised
      c.model = restore.adopt_model(c.model, meta, (), f'{source.directory}/{step}')
    saved = meta.get('model') or {}
    if saved.get('positions') == 'learned' and c.seq_len > saved.get('max_seq_len', c.seq_len):
      print(f'seq_len={c.seq_len} -> {saved["max_seq_len"]}: the model has learned positions for '
            f'{saved["max_seq_len"]} tokens (RoPE models take any length)', flush=True)
      c.seq_len = int(saved['max_seq_len'])
    c.workdir = paths.join(cfg.workdir, name.replace(' ', '_'))
    print(f'== fine-tuning from {name} ({c.workdir})', flush=True)
    out = finetune(c, overrides)
    outcome = outcome or out['summary']
    reports[name] = _demo_report(out)
  if outcome and outcome['eval'].get('baseline'):
    reports = {'n-gram baseline': outcome['eval']['baseline'], **reports}
  chosen = outcome['chosen_on'] if outcome else 'eval'
  how = 'best checkpoint chosen on validation' if chosen == 'validation' else 'last step'
  print(f'\nstdlib package classification, eval split ({how}):\n{task_metrics.table(reports)}', flush=True)
  if distributed.is_leader():
    paths.write_text(paths.join(cfg.workdir, 'demo.json'), json.dumps(reports, indent=2))
  return reports


def _demo_report(out: dict) -> dict:
  """A demo arm's eval report: its best checkpoint's when validation chose it, else its last step's."""
  outcome = out['summary']
  if outcome and outcome['chosen_on'] == 'validation' and outcome['eval'].get('best'):
    return outcome['eval']['best']
  return out['report']


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.finetune', usage=USAGE, description=DESCRIPTION)
  cli.add_config_flags(p, required=False, examples=DEMO_CONFIG,
                       note=f' (with --demo, default: {DEMO_CONFIG}; with --demo chat: finetune_chat)')
  cli.add_workdir_flags(p, required=False, checkpoint=False)
  p.add_argument('--demo', nargs='?', const='classify', default=None, choices=tuple(DEMO_CONFIGS),
                 help='classify (the default): fine-tune the embedded stdlib task from --config.init_from and from '
                      'random init; chat: SFT then DPO on a generated unit-conversion task')
  return p


def _finetune_command(argv: Sequence[str]) -> int:
  argv = [a.replace('--config.init_from', '--config.finetune.init_from', 1) if a.startswith('--config.init_from')
          else a for a in argv]
  args, overrides = cli.parse(parser(), argv)
  if not args.config and not args.demo:
    raise cli.UsageError('the following arguments are required: --config (or --demo)')
  cfg = cli.load_run_config(args.config or DEMO_CONFIGS[args.demo or 'classify'], args.workdir, overrides)
  check_config(cfg)
  cli.start_run(cfg)
  if args.demo == 'chat':
    from fmjax.finetune import chat_demo  # pylint: disable=import-outside-toplevel
    chat_demo.demo(cfg, overrides, finetune)
  elif args.demo:
    demo(cfg, overrides)
  else:
    finetune(cfg, overrides)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.finetune', _finetune_command, argv)
