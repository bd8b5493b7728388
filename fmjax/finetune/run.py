"""Fine-tune a pretrained model: `python -m fmjax.finetune --config configs/finetune_TASK.py
--config.init_from=PRETRAIN_WORKDIR --workdir DIR`.

The run is assembled by the pretraining builder (`fmjax.training.build.build_run` with the fine-tuning
task of fmjax/finetune/parts.py) and driven by the pretraining loop, checkpoints and workdir
lock. `--demo` fine-tunes the embedded stdlib task from the checkpoint and from random
initialisation and prints both metric tables.
"""

from __future__ import annotations

import contextlib
import json
from typing import Sequence

import jax

from fmjax import cli
from fmjax.training import build
from fmjax.checkpoints import store as checkpoint
from fmjax.runtime import distributed
from fmjax.training import loop
from fmjax.training import writers as metric_writers
from fmjax.training import numerics
from fmjax.checkpoints import resume
from fmjax.checkpoints import restore
from fmjax import config as config_lib
from fmjax.parallel import sharding as shd
from fmjax.runtime import paths
from fmjax.finetune import task_metrics
from fmjax.checkpoints import lock as workdir_lock
from fmjax.data import tokenizers
from fmjax.finetune import evaluation, schedule, splits, summary
from fmjax.finetune.parts import Parts

USAGE = """python -m fmjax.finetune --config configs/finetune_TASK.py --config.init_from=PRETRAIN_WORKDIR
       --workdir DIR [--config.KEY=VALUE ...]
python -m fmjax.finetune --demo --config.init_from=PRETRAIN_WORKDIR --workdir DIR

Fine-tune a pretrained fmjax checkpoint (classification, continued pretraining or prompt/response
tuning; see the finetune section of fmjax/config.py). --config.init_from is short for
--config.finetune.init_from. --demo runs the shipped finetune_stdlib config from the checkpoint and
from random initialisation and prints both metric tables side by side."""

TASKS = ('classify', 'lm', 'prompt')
CLASSIFY_METRICS = ('accuracy', 'macro_precision', 'macro_recall', 'macro_f1')
DEMO_CONFIG = 'finetune_stdlib'


def check_config(cfg) -> None:
  """Fine-tuning choices that the schema cannot check."""
  ft = cfg.finetune
  choices = {'task': TASKS, 'pooling': ('last', 'mean', 'cls'), 'best_mode': ('max', 'min')}
  for key, allowed in choices.items():
    if ft[key] not in allowed:
      raise config_lib.ConfigError(f'finetune.{key}={ft[key]!r} is not one of {", ".join(allowed)}')
  if ft.task == 'classify' and ft.best_metric not in CLASSIFY_METRICS:
    raise config_lib.ConfigError(f'finetune.best_metric={ft.best_metric!r} is not one of {", ".join(CLASSIFY_METRICS)}')
  if not 0 <= ft.freeze_layers <= cfg.model.num_layers:
    raise config_lib.ConfigError(f'finetune.freeze_layers={ft.freeze_layers} must be in [0, '
                                 f'model.num_layers={cfg.model.num_layers}]')
  if ft.lora_rank < 0:
    raise config_lib.ConfigError(f'finetune.lora_rank={ft.lora_rank} must be >= 0')
  ranges = {'epochs': (ft.epochs >= 0, '>= 0'), 'warmup_ratio': (0 <= ft.warmup_ratio < 1, 'in [0, 1)'),
            'layer_decay': (0 < ft.layer_decay <= 1, 'in (0, 1]'),
            'classifier_dropout': (0 <= ft.classifier_dropout < 1, 'in [0, 1)'),
            'validation_fraction': (0 <= ft.validation_fraction < 1, 'in [0, 1)')}
  for key, (ok, allowed) in ranges.items():
    if not ok:
      raise config_lib.ConfigError(f'finetune.{key}={ft[key]} must be {allowed}')


def finetune(cfg, overrides: Sequence[str] | None = None) -> dict:
  """Fine-tune per `cfg` (resolved); returns {'report' (the eval split's, last step), 'best' (best.json),
  'summary' (classify: summary.json, see fmjax/finetune/summary.py), 'history', 'state', 'last_step'}.

  finetune.epochs / warmup_ratio are resolved into cfg.steps / cfg.optim.warmup_steps from the train
  split's size (fmjax/finetune/schedule.py) before config.json is written.

  With finetune.init_from the model section is the checkpoint's (restore.adopt_model): `overrides` are
  the command line's items, and a `model.KEY=VALUE` among them that contradicts the checkpoint is refused;
  with None (a call from Python) every field of cfg.model must agree with the checkpoint.
  """

  check_config(cfg)
  ft, workdir = cfg.finetune, cfg.workdir
  with contextlib.ExitStack() as cleanup:   # closed in reverse: writer, tracker, checkpointer, then the lock
    lock = workdir_lock.lock_for_run(workdir, cfg.force_unlock)   # before anything in the workdir changes
    if lock is not None:
      cleanup.callback(lock.release)
    source = meta = None
    pretrain_workdir = where = ''
    if ft.init_from:   # the pretrained checkpoint defines the model: read it before anything else
      source, source_step, pretrain_workdir = restore.locate_checkpoint(ft.init_from)
      cleanup.callback(source.close)
      meta = source.read_metadata(source_step)
      where = f'{source.directory}/{source_step}'
      explicit = set(cfg.model.keys()) if overrides is None else restore.explicit_model_keys(overrides)
      cfg.model = restore.adopt_model(cfg.model, meta, explicit, where)
      config_lib.validate(cfg)
      check_config(cfg)
      checkpoint.check_compatible(meta, cfg.model, where)
    ckpt = checkpoint.Checkpointer(paths.join(workdir, 'checkpoints'), cfg.keep_checkpoints, cfg.async_checkpoints)
    cleanup.callback(ckpt.close)
    latest = ckpt.latest_step()
    if latest is not None:
      checkpoint.check_compatible(ckpt.read_metadata(latest), cfg.model, f'{ckpt.directory}/{latest}')
    data = splits.load(ft) if ft.task != 'lm' else None   # its size sets the steps of finetune.epochs
    notes = schedule.resolve(cfg, None if data is None else len(data.train))
    changes = resume.resume_changes(workdir, cfg, latest is not None, finetune=True)
    if distributed.is_leader():
      config_lib.save(cfg, paths.join(workdir, 'config.json'))
    tokenizer = _tokenizer(cfg, meta, pretrain_workdir, where)
    mesh = shd.make_mesh(cfg.mesh)
    build.check_batch(cfg, mesh)
    start = int(latest or 0)
    writer = metric_writers.MetricWriter(workdir, cfg.steps, initial_step=start, progress_bar=cfg.progress_bar,
                                         resume_step=start)  # drops records of steps after the checkpoint
    cleanup.callback(writer.close)
    writer.log(f'fmjax.finetune: task {ft.task}; {distributed.describe()}; mesh {shd.describe(mesh)}')
    for line in changes + notes + _describe_splits(data):
      writer.log(line)
    baseline = None
    if ft.task == 'classify' and ft.baseline and distributed.is_leader():
      baseline = summary.fit_baseline(ft, data, writer.log)

    parts = Parts(cfg, mesh, tokenizer, data=data)        # model, optimizer, compiled step
    run = parts.run
    extra = {'finetune': ft.to_dict(), 'classes': list(parts.class_names), 'init_from': ft.init_from}
    run_meta = checkpoint.make_metadata(cfg, tokenizers.place_in_workdir(tokenizer, workdir), extra)
    if latest is not None:
      state = ckpt.restore(latest, run.state.abstract, data_arg=parts.data_restore_arg())
      writer.log(f'resumed from {ckpt.directory}/{latest}')
    else:
      state = run.init(jax.random.PRNGKey(cfg.seed))
      if source is not None:
        state = state.replace(params=parts.load_pretrained(state.params, source, source_step))
        writer.log(f'loaded pretrained parameters from {source.directory}/{source_step}')
    if hasattr(parts.batches, 'start'):
      parts.batches.start(start)
    writer.log(f'trainable: {parts.trainable_summary}; step compiled in {run.compile_seconds:.1f}s')

    evaluate, tracker = evaluation.evaluation(cfg, parts, workdir, run_meta, writer, baseline)
    cleanup.callback(tracker.close)

    def save(step, state, wait):
      ckpt.save(step, state, run_meta, data_arg=parts.data_save_arg(), force=True)
      if wait:
        ckpt.wait()

    result = loop.LoopResult(state=state, last_step=start)
    if start < cfg.steps:
      result = loop.run_loop(
          train_step=run.train_step, state=state, batches=parts.batches, batch_sharding=run.batch_sharding,
          start_step=start, total_steps=cfg.steps, writer=writer, model_cfg=cfg.model, seq_len=cfg.seq_len,
          tokens_per_step=cfg.global_batch_size * cfg.seq_len, log_every=cfg.log_every,
          checkpoint_every=cfg.checkpoint_every, save=save, evaluate=evaluate,
          eval_every=cfg.eval_every or cfg.steps, cpu_peak_flops=cfg.cpu_peak_flops,
          compute_dtype=cfg.model.dtype, guards=numerics.GuardConfig.from_config(cfg))
    else:
      writer.log(f'nothing to do: the checkpoint is at step {start} and steps={cfg.steps}')
    if ft.lora_rank and distributed.is_leader():
      parts.save_adapters(result.state, paths.join(workdir, 'adapters'), result.last_step, run_meta)
    outcome = None
    if ft.task == 'classify':
      outcome = summary.summarize(tracker, baseline, result.last_step)
      if distributed.is_leader():
        summary.write_summary(paths.join(workdir, 'summary.json'), outcome)
        writer.log(summary.tables(outcome))
  last = tracker.last
  if last is not None and 'eval' in last:   # validation chose: the eval split's report of the last step
    last = last['eval']
  return {'report': last, 'best': tracker.best, 'summary': outcome, 'history': result.history,
          'state': result.state, 'last_step': result.last_step}


def _tokenizer(cfg, meta, pretrain_workdir: str, where: str):
  """The checkpoint's tokenizer (with init_from), else data.tokenizer; checked against the vocabulary."""
  if pretrain_workdir:
    spec = meta.get('tokenizer', 'byte')
    if not spec:
      raise checkpoint.CheckpointError(f'{where} records no tokenizer: import the model again with one '
                                       '(fmjax-convert from-hf --tokenizer byte|FILE)')
    tokenizer = restore.load_tokenizer(pretrain_workdir, spec)
  else:
    tokenizer = tokenizers.load_tokenizer(cfg.data.tokenizer)
  tokenizers.check_vocab(tokenizer, cfg.model.vocab_size)
  return tokenizer


def _describe_splits(data) -> list[str]:
  if data is None:
    return []
  held = (f'{len(data.validation)} validation ({data.validation_from}; chooses the best checkpoint)'
          if data.validation is not None else 'no validation')
  return [f'examples: {len(data.train)} train, {held}, {len(data.eval)} eval (reported)']


def demo(cfg, overrides: Sequence[str] | None = None) -> dict:
  """Fine-tune the same task from cfg.finetune.init_from and from random initialisation; print both beside
  the n-gram baseline (eval split; each model at its best checkpoint, chosen on validation when there is
  one, else at its last step). Writes WORKDIR/demo.json."""
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


def _finetune_command(argv: Sequence[str]) -> int:
  argv = [a.replace('--config.init_from', '--config.finetune.init_from', 1) if a.startswith('--config.init_from')
          else a for a in argv]
  parser = cli.ArgumentParser(prog='fmjax.finetune', usage=USAGE, description=__doc__.splitlines()[0])
  cli.add_config_flags(parser, required=False)
  cli.add_workdir_flags(parser, required=False, checkpoint=False)
  parser.add_argument('--demo', action='store_true',
                      help='fine-tune the embedded stdlib task from --config.init_from and from random init')
  args, overrides = cli.parse(parser, argv)
  if not args.config and not args.demo:
    raise cli.UsageError('the following arguments are required: --config (or --demo)')
  cfg = cli.load_run_config(args.config or DEMO_CONFIG, args.workdir, overrides)
  check_config(cfg)
  cli.start_run(cfg)
  if args.demo:
    demo(cfg, overrides)
  else:
    finetune(cfg, overrides)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.finetune', _finetune_command, argv)
