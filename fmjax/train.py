"""Pretrain a language model: `python -m fmjax.train --config configs/default.py --workdir DIR`.

Any config field can be overridden: `--config.model.num_layers=2 --config.steps=100`.
Rerunning with the same workdir resumes from its latest complete checkpoint. One run at a time
holds a workdir (fmjax/workdir_lock.py). On resume the changes from the saved config.json are
printed, and run-defining ones (model, steps, schedule, seed, data, batch, seq_len) are refused
unless `--config.allow_config_change=true`; the check comes before config.json is rewritten.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
from typing import Sequence

from fmjax import config as config_lib
from fmjax import hugepages
from fmjax import distributed

USAGE = """python -m fmjax.train --config CONFIG.py --workdir DIR [--config.KEY=VALUE ...]

Pretrain a decoder-only Transformer. Every field of the config can be overridden with
--config.a.b=value (e.g. --config.model.num_layers=2 --config.steps=200). Rerunning with the
same --workdir resumes from the latest complete checkpoint there (changing run-defining options such
as the model, steps or learning-rate schedule then needs --config.allow_config_change=true)."""


def parse_args(argv: Sequence[str], prog: str = 'fmjax.train', usage: str = USAGE):
  """(config path, workdir, overrides) from the command line; `--config.x y` is accepted too."""
  parser = argparse.ArgumentParser(prog=prog, usage=usage)
  parser.add_argument('--config', required=True, help='a get_config() Python file, e.g. configs/default.py')
  parser.add_argument('--workdir', default=None, help='where checkpoints, logs and the resolved config go')
  args, rest = parser.parse_known_args(argv)
  overrides, i = [], 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith('--config.'):
      parser.error(f'unrecognised argument {item!r}; overrides look like --config.key=value')
    if '=' not in item and i + 1 < len(rest) and not rest[i + 1].startswith('--'):
      item, i = f'{item}={rest[i + 1]}', i + 1
    overrides.append(item)
    i += 1
  return args.config, args.workdir, overrides


def resolve_config(config_path: str, workdir: str | None, overrides: Sequence[str]):
  """Load, override, validate; the workdir flag wins over `config.workdir`."""
  cfg = config_lib.resolve(config_path, overrides)
  if workdir:
    cfg.workdir = workdir
  if not cfg.workdir:
    raise config_lib.ConfigError('no workdir: pass --workdir DIR')
  cfg.workdir = os.path.abspath(os.path.expanduser(cfg.workdir))
  return cfg


def place_tokenizer(tokenizer, workdir: str) -> str:
  """Copy a tokenizer file into the workdir; return the spec to record ('byte' or the copy's name)."""
  if tokenizer.path is None:
    return tokenizer.spec
  name = 'tokenizer.model'
  target = os.path.join(workdir, name)
  if distributed.is_leader() and os.path.abspath(tokenizer.path) != os.path.abspath(target):
    shutil.copyfile(tokenizer.path, target)
  return name


# Options whose change alters what a resumed run means (refused unless allow_config_change); every
# other change (logging, checkpointing, mesh, attention kernel, remat, compute dtype, microbatches,
# ...) is printed and allowed. A trailing dot means the whole section. `steps` is allowed to change
# when optim.decay_steps fixes the schedule (then it only extends or shortens the run).
RUN_DEFINING = ('model.', 'steps', 'seed', 'global_batch_size', 'seq_len', 'optim.learning_rate',
                'optim.end_learning_rate', 'optim.warmup_steps', 'optim.decay_steps', 'data.source', 'data.files',
                'data.tokenizer', 'data.tfds_name', 'data.jsonl_field', 'data.text_feature', 'data.split_by',
                'data.train_split', 'data.validation_fraction', 'data.packing', 'data.add_bos', 'data.add_eos',
                'data.num_streams')
FINETUNE_DEFINING = ('finetune.',)
HARMLESS = ('model.attention', 'model.attention_chunk', 'model.remat', 'model.remat_names', 'model.dtype',
            'model.scan_layers', 'model.loss_vocab_chunk', 'finetune.best_metric', 'finetune.best_mode',
            'finetune.eval_files', 'finetune.eval_split', 'finetune.max_eval_examples')
NOT_COMPARED = ('workdir', 'allow_config_change', 'force_unlock')
_ABSENT = object()


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
  """(key, saved value, new value) for every dotted key that differs (absent keys: `_ABSENT`)."""
  old, cur = _flatten(saved), _flatten(new)
  return [(k, old.get(k, _ABSENT), cur.get(k, _ABSENT)) for k in sorted(set(old) | set(cur))
          if k not in NOT_COMPARED and old.get(k, _ABSENT) != cur.get(k, _ABSENT)]


def is_run_defining(key: str, finetune: bool = False) -> bool:
  """Whether changing `key` on resume alters the run's meaning (see RUN_DEFINING)."""
  if key in HARMLESS:
    return False
  defining = RUN_DEFINING + (FINETUNE_DEFINING if finetune else ())
  return any(key == d or (d.endswith('.') and key.startswith(d)) for d in defining)


def _show(value) -> str:
  return '(absent)' if value is _ABSENT else json.dumps(value)


def resume_changes(workdir: str, cfg, resuming: bool, finetune: bool = False) -> list[str]:
  """Lines listing how `cfg` differs from WORKDIR/config.json when resuming a checkpoint.

  Raises ConfigError (one line) on a run-defining change unless `cfg.allow_config_change`; call
  it before writing config.json, so that a refused resume leaves the workdir as it was.
  """
  path = os.path.join(workdir, 'config.json')
  if not resuming or not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    return [f'note: cannot read the saved {path} ({e}); the config is not compared']
  new = json.loads(config_lib.to_json(cfg))
  changes = config_changes(saved, new)
  # `steps` matters through the schedule; with a fixed optim.decay_steps it only lengthens or shortens the run
  fixed_schedule = bool(new['optim']['decay_steps']) and saved.get('optim', {}).get('decay_steps') == \
      new['optim']['decay_steps']
  defining = [c for c in changes if is_run_defining(c[0], finetune) and not (c[0] == 'steps' and fixed_schedule)]
  if defining and not cfg.get('allow_config_change', False):
    shown = ', '.join(f'{k} {_show(o)} -> {_show(n)}' for k, o, n in defining[:4])
    more = f' and {len(defining) - 4} more' if len(defining) > 4 else ''
    raise config_lib.ConfigError(f'resuming {workdir} with changed run-defining options: {shown}{more}; restore them, '
                                 'pass --config.allow_config_change=true to resume anyway, or use another --workdir')
  return [f'config change on resume: {k}: {_show(o)} -> {_show(n)}'
          + (' (run-defining, allowed by allow_config_change)' if (k, o, n) in defining else '')
          for k, o, n in changes]


def open_writer(workdir: str, cfg, start: int, latest: int | None):
  """The metric writer of a run starting after step `start` (`latest`: the restored checkpoint, or None)."""
  from fmjax import metric_writers
  kwargs = dict(initial_step=start, progress_bar=cfg.progress_bar)
  if 'resume_step' in inspect.signature(metric_writers.MetricWriter).parameters:
    kwargs['resume_step'] = latest
  return metric_writers.MetricWriter(workdir, cfg.steps, **kwargs)


def build_run(cfg, mesh):
  """build.build_lm_run, with the train step that skips non-finite steps when skip_nonfinite_steps > 0."""
  from fmjax import build
  from fmjax import step as step_lib
  run = build.build_lm_run(cfg, mesh, compile_step=not cfg.skip_nonfinite_steps)
  if cfg.skip_nonfinite_steps:
    loss = step_lib.lm_loss_fn(run.model, cfg.z_loss, cfg.model.loss_vocab_chunk)
    run.compile_train_step(step_lib.make_train_step(loss, run.tx, run.schedule, microbatches=cfg.microbatches,
                                                    dropout=cfg.model.dropout > 0, seed=cfg.seed,
                                                    skip_nonfinite=True))
  return run


def train(cfg) -> 'loop.LoopResult':
  """Pretrain per `cfg` (resolved); returns the loop result (final state, logged history)."""
  import jax
  from fmjax import checkpoint, loop, numerics, workdir_lock
  from fmjax import evaluate as evaluate_lib
  from fmjax import sharding as shd
  from fmjax.data import pipeline, stream_set, tokenizers

  workdir = cfg.workdir
  with contextlib.ExitStack() as cleanup:   # closed in reverse: writer, checkpointer, then the lock
    lock = workdir_lock.lock_for_run(workdir, cfg.force_unlock)   # before anything in the workdir changes
    if lock is not None:
      cleanup.callback(lock.release)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.keep_checkpoints,
                                   cfg.async_checkpoints)
    cleanup.callback(ckpt.close)
    latest = ckpt.latest_step()
    if latest is not None:  # fail on an incompatible checkpoint before compiling anything
      checkpoint.check_compatible(ckpt.read_metadata(latest), cfg.model, f'{ckpt.directory}/{latest}')
    changes = resume_changes(workdir, cfg, latest is not None)
    if distributed.is_leader():
      config_lib.save(cfg, os.path.join(workdir, 'config.json'))
    tokenizer = tokenizers.load_tokenizer(cfg.data.tokenizer)
    tokenizers.check_vocab(tokenizer, cfg.model.vocab_size)
    mesh = shd.make_mesh(cfg.mesh)
    distributed.check_devices()
    local_batch = cfg.global_batch_size // jax.process_count()
    batches = pipeline.make_train_iterator(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=local_batch,
                                           seed=cfg.seed, process_index=jax.process_index(),
                                           process_count=jax.process_count())
    start = latest or 0
    writer = open_writer(workdir, cfg, start, latest)
    cleanup.callback(writer.close)
    writer.log(f'fmjax: {distributed.describe()}; mesh {shd.describe(mesh)}')
    for line in changes:
      writer.log(line)

    run = build_run(cfg, mesh)
    from fmjax.state import param_count
    n_params = param_count(run.state.abstract.params)
    writer.log(f'model: {n_params / 1e6:.2f}M parameters; train step compiled in {run.compile_seconds:.1f}s')
    memory = run.train_step.memory_analysis()
    if memory is not None:
      writer.log(f'per-device memory: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, '
                 f'temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB')

    meta = checkpoint.make_metadata(cfg, place_tokenizer(tokenizer, workdir))

    if latest is not None:
      state = ckpt.restore(latest, run.state.abstract)
      batches.set_state(stream_set.read_saved_state(os.path.join(ckpt.directory, str(latest), 'data')))
      writer.log(f'resumed from {ckpt.directory}/{latest}')
    else:
      state = run.init(jax.random.PRNGKey(cfg.seed))
    if start >= cfg.steps:
      writer.log(f'nothing to do: the checkpoint is at step {start} and steps={cfg.steps}')
      return loop.LoopResult(state=state, last_step=start)

    evaluate = None
    if cfg.eval_every:
      eval_batches = pipeline.make_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=local_batch,
                                                num_batches=cfg.eval_batches, process_index=jax.process_index(),
                                                process_count=jax.process_count())
      evaluator = evaluate_lib.make_evaluator(run, tokenizer.token_byte_lengths())

      def evaluate(state, step):
        return evaluator(state.params, eval_batches)

    def save(step, state, wait):
      ckpt.save(step, state, meta, data_arg=pipeline.checkpoint_save_arg(batches), force=True)
      if wait:
        ckpt.wait()

    return loop.run_loop(
        train_step=run.train_step, state=state, batches=batches, batch_sharding=run.batch_sharding,
        start_step=start, total_steps=cfg.steps, writer=writer, model_cfg=cfg.model, seq_len=cfg.seq_len,
        tokens_per_step=cfg.global_batch_size * cfg.seq_len, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, save=save, evaluate=evaluate, eval_every=cfg.eval_every,
        cpu_peak_flops=cfg.cpu_peak_flops, compute_dtype=cfg.model.dtype,
        guards=numerics.GuardConfig.from_config(cfg))


def user_errors() -> tuple:
  """Exception types that mean 'the user must fix an input' (printed as one line, exit 2)."""
  from fmjax.checkpoint import CheckpointError
  from fmjax.data.errors import DataError
  from fmjax.numerics import NonFiniteError
  from fmjax.sharding import MeshError
  from fmjax.workdir_lock import WorkdirLockedError
  return (config_lib.ConfigError, MeshError, CheckpointError, DataError, distributed.TopologyError, NonFiniteError,
          WorkdirLockedError)


def main(argv: Sequence[str] | None = None) -> int:
  if argv is None:  # the command line, not a call from Python
    hugepages.reexec_with_hugepages()
  argv = sys.argv[1:] if argv is None else argv
  prog = 'fmjax.train'
  try:
    config_path, workdir, overrides = parse_args(argv, prog)
    cfg = resolve_config(config_path, workdir, overrides)
    distributed.initialize()
    result = train(cfg)
  except user_errors() as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 2
  return 0 if result is not None else 1


if __name__ == '__main__':
  sys.exit(main())
