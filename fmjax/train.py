"""Pretrain a language model: `python -m fmjax.train --config configs/default.py --workdir DIR`.

Any config field can be overridden: `--config.model.num_layers=2 --config.steps=100`.
Rerunning with the same workdir resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import argparse
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
same --workdir resumes from the latest complete checkpoint there."""


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


def train(cfg) -> 'loop.LoopResult':
  """Pretrain per `cfg` (resolved); returns the loop result (final state, logged history)."""
  import jax
  from fmjax import build, checkpoint, loop, metric_writers
  from fmjax import evaluate as evaluate_lib
  from fmjax import sharding as shd
  from fmjax.data import pipeline, stream_set, tokenizers

  workdir = cfg.workdir
  os.makedirs(workdir, exist_ok=True)
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
  writer = metric_writers.MetricWriter(workdir, cfg.steps, progress_bar=cfg.progress_bar)
  writer.log(f'fmjax: {distributed.describe()}; mesh {shd.describe(mesh)}')

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.keep_checkpoints,
                                 cfg.async_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:  # fail on an incompatible checkpoint before compiling anything
    checkpoint.check_compatible(ckpt.read_metadata(latest), cfg.model, f'{ckpt.directory}/{latest}')

  run = build.build_lm_run(cfg, mesh)
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
    start = latest
  else:
    state = run.init(jax.random.PRNGKey(cfg.seed))
    start = 0
  if start >= cfg.steps:
    writer.log(f'nothing to do: the checkpoint is at step {start} and steps={cfg.steps}')
    ckpt.close()
    writer.close()
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

  try:
    result = loop.run_loop(
        train_step=run.train_step, state=state, batches=batches, batch_sharding=run.batch_sharding,
        start_step=start, total_steps=cfg.steps, writer=writer, model_cfg=cfg.model, seq_len=cfg.seq_len,
        tokens_per_step=cfg.global_batch_size * cfg.seq_len, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, save=save, evaluate=evaluate, eval_every=cfg.eval_every,
        cpu_peak_flops=cfg.cpu_peak_flops,
        compute_dtype=cfg.model.dtype)
  finally:
    ckpt.close()
    writer.close()
  return result



def user_errors() -> tuple:
  """Exception types that mean 'the user must fix an input' (printed as one line, exit 2)."""
  from fmjax.checkpoint import CheckpointError
  from fmjax.data.errors import DataError
  from fmjax.sharding import MeshError
  return (config_lib.ConfigError, MeshError, CheckpointError, DataError, distributed.TopologyError)


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
