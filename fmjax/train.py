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

import contextlib
import os
import sys
from typing import Sequence

from fmjax import cli
from fmjax import config as config_lib
from fmjax.runtime import distributed
from fmjax.runtime import paths

USAGE = """python -m fmjax.train --config CONFIG.py --workdir DIR [--init-from CHECKPOINT] [--config.KEY=VALUE ...]

Pretrain a decoder-only Transformer. Every field of the config can be overridden with
--config.a.b=value (e.g. --config.model.num_layers=2 --config.steps=200). Rerunning with the
same --workdir resumes from the latest complete checkpoint there (changing run-defining options such
as the model, steps or learning-rate schedule then needs --config.allow_config_change=true)."""


def _adopt_checkpoint(cfg, init_from: str, overrides, cleanup):
  """(Checkpointer, step) of `init_from`; cfg.model and cfg.data.tokenizer become the checkpoint's."""
  from fmjax.checkpoints import restore
  source, step, workdir = restore.locate_checkpoint(init_from)
  cleanup.callback(source.close)
  meta = source.read_metadata(step)
  explicit = set(cfg.model.keys()) if overrides is None else restore.explicit_model_keys(overrides)
  cfg.model = restore.adopt_model(cfg.model, meta, explicit, f'{source.directory}/{step}')
  spec = meta.get('tokenizer', cfg.data.tokenizer)
  if not spec:
    raise restore.CheckpointError(f'{source.directory}/{step} records no tokenizer: import the model with one')
  cfg.data.tokenizer = spec if spec == 'byte' else paths.join(workdir, spec)
  config_lib.validate(cfg)
  return source, step


def train(cfg, init_from: str | None = None, overrides: Sequence[str] | None = None) -> 'loop.LoopResult':
  """Pretrain per `cfg` (resolved); returns the loop result (final state, logged history).

  `init_from`: start from that checkpoint's parameters, with its model and tokenizer; `overrides` are the
  command line's items (a `model.KEY` among them contradicting the checkpoint is refused; None: all of cfg.model).
  """
  import jax
  from fmjax.training import build
  from fmjax.checkpoints import store as checkpoint
  from fmjax.training import loop
  from fmjax.training import writers as metric_writers
  from fmjax.training import numerics
  from fmjax.checkpoints import resume
  from fmjax.checkpoints import lock as workdir_lock
  from fmjax.inference import evaluate as evaluate_lib
  from fmjax.parallel import sharding as shd
  from fmjax.data import pipeline, stream_set, tokenizers

  workdir = cfg.workdir
  with contextlib.ExitStack() as cleanup:   # closed in reverse: writer, checkpointer, then the lock
    lock = workdir_lock.lock_for_run(workdir, cfg.force_unlock)   # before anything in the workdir changes
    if lock is not None:
      cleanup.callback(lock.release)
    source = _adopt_checkpoint(cfg, init_from, overrides, cleanup) if init_from else None
    ckpt = checkpoint.Checkpointer(paths.join(workdir, 'checkpoints'), cfg.keep_checkpoints,
                                   cfg.async_checkpoints)
    cleanup.callback(ckpt.close)
    latest = ckpt.latest_step()
    if latest is not None:  # fail on an incompatible checkpoint before compiling anything
      checkpoint.check_compatible(ckpt.read_metadata(latest), cfg.model, f'{ckpt.directory}/{latest}')
    changes = resume.resume_changes(workdir, cfg, latest is not None)
    if distributed.is_leader():
      config_lib.save(cfg, paths.join(workdir, 'config.json'))
    tokenizer = tokenizers.load_tokenizer(cfg.data.tokenizer)
    tokenizers.check_vocab(tokenizer, cfg.model.vocab_size)
    mesh = shd.make_mesh(cfg.mesh)
    distributed.check_devices()
    local_batch = cfg.global_batch_size // jax.process_count()
    batches = pipeline.make_train_iterator(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=local_batch,
                                           seed=cfg.seed, process_index=jax.process_index(),
                                           process_count=jax.process_count())
    if cfg.eval_every:
      pipeline.check_eval_split(cfg.data)   # an empty validation split is found before compiling
    start = latest or 0
    writer = metric_writers.MetricWriter(workdir, cfg.steps, initial_step=start, progress_bar=cfg.progress_bar,
                                         resume_step=start)  # drops records of steps after the checkpoint
    cleanup.callback(writer.close)
    writer.log(f'fmjax: {distributed.describe()}; mesh {shd.describe(mesh)}')
    for line in changes:
      writer.log(line)

    run = build.build_lm_run(cfg, mesh)
    from fmjax.training.state import param_count
    n_params = param_count(run.state.abstract.params)
    writer.log(f'model: {n_params / 1e6:.2f}M parameters; train step compiled in {run.compile_seconds:.1f}s')
    memory = run.train_step.memory_analysis()
    if memory is not None:
      writer.log(f'per-device memory: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, '
                 f'temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB')

    meta = checkpoint.make_metadata(cfg, tokenizers.place_in_workdir(tokenizer, workdir))

    if latest is not None:
      state = ckpt.restore(latest, run.state.abstract)
      batches.set_state(stream_set.read_saved_state(paths.join(ckpt.directory, str(latest), 'data')))
      writer.log(f'resumed from {ckpt.directory}/{latest}')
    else:
      state = run.init(jax.random.PRNGKey(cfg.seed))
      if source is not None:
        state = state.replace(params=source[0].restore(source[1], run.state.abstract.params, params_only=True))
        writer.log(f'initialised from {source[0].directory}/{source[1]}')
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


def _train_command(argv: Sequence[str]) -> int:
  parser = cli.ArgumentParser(prog='fmjax.train', usage=USAGE, description=__doc__.splitlines()[0])
  cli.add_config_flags(parser)
  cli.add_workdir_flags(parser, required=False, checkpoint=False)
  parser.add_argument('--init-from', default=None, metavar='CHECKPOINT',
                      help="start from this checkpoint's parameters, model and tokenizer (a workdir or step dir)")
  args, overrides = cli.parse(parser, argv)
  cfg = cli.load_run_config(args.config, args.workdir, overrides)
  cli.start_run(cfg)
  train(cfg, args.init_from, overrides)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.train', _train_command, argv)


if __name__ == '__main__':
  sys.exit(main())
