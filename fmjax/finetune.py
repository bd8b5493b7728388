"""Fine-tune a pretrained model: `python -m fmjax.finetune --config configs/finetune_TASK.py
--config.init_from=PRETRAIN_WORKDIR --workdir DIR`.

Tasks (`finetune.task`): `classify` (a head on the pooled hidden state), `lm` (continued
pretraining on `cfg.data`) and `prompt` (LM loss on response tokens only). The pretrained
parameters (a workdir's latest checkpoint, or a checkpoint directory) are loaded onto this run's
mesh with a fresh optimizer, and the pretraining tokenizer comes from the checkpoint metadata.
Adaptation: full, frozen embeddings / first N blocks, a separate head learning rate, or LoRA.
The step, loop and checkpoints are the pretraining ones (fmjax.step, fmjax.loop, fmjax.checkpoint).
`--demo` fine-tunes the embedded stdlib task from the checkpoint and from random initialisation
and prints both metric tables.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax import build, checkpoint, loop, optim, task_metrics
from fmjax import config as config_lib
from fmjax import hugepages
from fmjax import distributed
from fmjax import numerics, workdir_lock
from fmjax import sharding as shd
from fmjax import state as state_lib
from fmjax import step as step_lib
from fmjax import train as train_lib
from fmjax.checkpoint import Checkpointer, CheckpointError, abstract_like
from fmjax.classify import HEAD, Classifier, loss_fn, predict_fn
from fmjax.data import labeled, pipeline, tokenizers
from fmjax.model import Transformer, lora

USAGE = """python -m fmjax.finetune --config configs/finetune_TASK.py --config.init_from=PRETRAIN_WORKDIR
       --workdir DIR [--config.KEY=VALUE ...]
python -m fmjax.finetune --demo --config.init_from=PRETRAIN_WORKDIR --workdir DIR

Fine-tune a pretrained fmjax checkpoint (classification, continued pretraining or prompt/response
tuning; see the finetune section of fmjax/config.py). --config.init_from is short for
--config.finetune.init_from. --demo runs configs/finetune_stdlib.py from the checkpoint and from
random initialisation and prints both metric tables side by side."""

TASKS = ('classify', 'lm', 'prompt')
CLASSIFY_METRICS = ('accuracy', 'macro_precision', 'macro_recall', 'macro_f1')
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                           'finetune_stdlib.py')


def parse_args(argv: Sequence[str]):
  """(demo, config path, workdir, overrides); `--config.init_from` means `--config.finetune.init_from`."""
  argv = list(argv)
  demo = '--demo' in argv
  argv = [a for a in argv if a != '--demo']
  if demo and not any(a == '--config' or a.startswith('--config=') for a in argv):
    argv = ['--config', DEMO_CONFIG] + argv
  argv = [a.replace('--config.init_from', '--config.finetune.init_from', 1) if a.startswith('--config.init_from')
          else a for a in argv]
  config_path, workdir, overrides = train_lib.parse_args(argv, 'fmjax.finetune', USAGE)
  return demo, config_path, workdir, overrides


def check_config(cfg) -> None:
  """Fine-tuning choices that the schema cannot check."""
  ft = cfg.finetune
  choices = {'task': TASKS, 'pooling': ('last', 'mean'), 'best_mode': ('max', 'min')}
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


def find_checkpoint(path: str):
  """A workdir, a checkpoints directory or one step directory -> (Checkpointer, step, pretrain workdir)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f'finetune.init_from={path} is not a directory: pass a pretraining workdir or a '
                          'checkpoint directory')
  step = None
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    directory = os.path.join(path, 'checkpoints')
  elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, 'state')):
    directory, step = os.path.dirname(path), int(os.path.basename(path))
  else:
    directory = path
  ckpt = Checkpointer(directory, keep=1000, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no complete checkpoint in {directory}: pretrain first (python -m fmjax.train ...)')
  return ckpt, step, os.path.dirname(directory)


def load_tokenizer(cfg, meta: dict | None, pretrain_workdir: str | None):
  """The pretraining tokenizer (from checkpoint metadata), else cfg.data.tokenizer."""
  spec = cfg.data.tokenizer if meta is None else meta.get('tokenizer', 'byte')
  if meta is not None and spec != 'byte' and not os.path.isabs(spec):
    spec = os.path.join(pretrain_workdir, spec)
  tokenizer = tokenizers.load_tokenizer(spec)
  tokenizers.check_vocab(tokenizer, cfg.model.vocab_size)
  return tokenizer


# ---------------------------------------------------------------------------------------------
# Which parameters train, and how fast.

def _names(path) -> list[str]:
  return [str(p.key) for p in path if hasattr(p, 'key')]


def param_group(names: Sequence[str], cfg) -> str:
  """'head' | 'base' | 'frozen' for a parameter path (a whole leaf; row freezing is separate)."""
  ft, top = cfg.finetune, names[0]
  if top == HEAD:
    return 'head'
  if ft.lora_rank > 0:
    return 'base' if names[-1] in lora.ADAPTER_KEYS else 'frozen'
  if ft.freeze_embeddings and top in ('embedding', 'pos_embedding'):
    return 'frozen'
  if top.startswith('layers_') and int(top[len('layers_'):]) < ft.freeze_layers:
    return 'frozen'
  if top == 'layers' and ft.freeze_layers >= cfg.model.num_layers:
    return 'frozen'
  return 'base'


def scale_by_group(cfg, head_scale: float = 1.0) -> optax.GradientTransformation:
  """Multiply each leaf by its group's factor: frozen 0, head `head_scale`, base 1; the first
  finetune.freeze_layers rows of scanned (stacked) block parameters 0."""
  rows = cfg.finetune.freeze_layers if cfg.model.scan_layers and not cfg.finetune.lora_rank else 0

  def scale(path, u):
    names = _names(path)
    group = param_group(names, cfg)
    if group == 'frozen':
      return jnp.zeros_like(u)
    if group == 'head' and head_scale != 1.0:
      return u * head_scale
    if rows and names[0] == 'layers':
      keep = (jnp.arange(u.shape[0]) >= rows).astype(u.dtype)
      return u * keep.reshape((-1,) + (1,) * (u.ndim - 1))
    return u

  def update(updates, state, params=None):
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg):
  """fmjax's AdamW between two `scale_by_group`s: frozen gradients are zeroed before clipping,
  frozen updates (weight decay too) after; head updates scaled to finetune.head_learning_rate.
  Returns (tx, schedule). Frozen leaves keep (unused) Adam moments."""
  ratio = cfg.finetune.head_learning_rate / cfg.optim.learning_rate if cfg.finetune.head_learning_rate else 1.0
  tx = optax.chain(scale_by_group(cfg), optim.make_optimizer(cfg.optim, cfg.steps), scale_by_group(cfg, ratio))
  return tx, optim.learning_rate_schedule(cfg.optim, cfg.steps)


def trainable_summary(params, cfg) -> str:
  counts = {'head': 0, 'base': 0, 'frozen': 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    counts[param_group(_names(path), cfg)] += int(leaf.size)
  rows = ''
  if cfg.finetune.freeze_layers and cfg.model.scan_layers and not cfg.finetune.lora_rank:
    rows = f' (first {cfg.finetune.freeze_layers} of the stacked blocks frozen by row)'
  return (f'{(counts["base"] + counts["head"]) / 1e6:.3f}M of {sum(counts.values()) / 1e6:.3f}M parameters train'
          f'{rows}; head {counts["head"]}')


# ---------------------------------------------------------------------------------------------
# The run: data, model, optimizer, compiled step.

class Parts:
  """What `finetune` needs beyond the shared loop: the Run, data, loading, evaluation hooks."""

  def __init__(self, cfg, mesh, tokenizer, compile_step: bool = True):
    self.cfg, self.tokenizer, ft = cfg, tokenizer, cfg.finetune
    self.class_names, self.classifier, self.eval_rows, self._grain = (), None, None, None
    self._load_data()
    model_cfg = lora.with_lora(cfg.model, ft.lora_rank, ft.lora_alpha, ft.lora_targets) if ft.lora_rank else cfg.model
    model = Transformer(model_cfg)
    tx, schedule = make_optimizer(cfg)
    if ft.task == 'classify':
      self.classifier = Classifier(model, len(self.class_names), ft.pooling)
      params_fn, loss = (lambda rng: self.classifier.init(rng, cfg.seq_len)), loss_fn(self.classifier)
    else:
      params_fn = lambda rng: model.init({'params': rng, 'dropout': rng}, state_lib.dummy_tokens(1, cfg.seq_len))['params']
      loss = step_lib.lm_loss_fn(model, cfg.z_loss, cfg.model.loss_vocab_chunk)

    def init_fn(rng):
      params = params_fn(rng)
      return state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))

    rules = shd.axis_rules(cfg)
    sharded, init = state_lib.sharded_state(model, tx, mesh, rules, cfg.seq_len, init_fn=init_fn)
    self.run = build.Run(cfg=cfg, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule, state=sharded,
                         init=init, batch_sharding=shd.batch_sharding(mesh, rules))
    if compile_step:
      self.run.compile_train_step(step_lib.make_train_step(
          loss, tx, schedule, microbatches=cfg.microbatches, dropout=cfg.model.dropout > 0, seed=cfg.seed,
          skip_nonfinite=cfg.skip_nonfinite_steps > 0))
    self.trainable_summary = trainable_summary(sharded.abstract.params, cfg)

  def _load_data(self):
    cfg, ft, tok = self.cfg, self.cfg.finetune, self.tokenizer
    pi, pc = jax.process_index(), jax.process_count()
    if ft.task == 'lm':  # continued pretraining: the pretraining pipeline on cfg.data
      local = cfg.global_batch_size // pc
      self.batches = self._grain = pipeline.make_train_iterator(cfg.data, tok, seq_len=cfg.seq_len, batch_size=local,
                                                                seed=cfg.seed, process_index=pi, process_count=pc)
      self.eval_rows = pipeline.make_eval_batches(cfg.data, tok, seq_len=cfg.seq_len, batch_size=local,
                                                  num_batches=cfg.eval_batches, process_index=pi, process_count=pc)
      return
    rows = {}
    for split in ('train', 'eval'):
      if ft.task == 'classify':
        data = labeled.load_split(ft, split, (ft.text_feature, ft.label_feature))
        if split == 'train':
          self.class_names = labeled.label_set(ft, data[ft.label_feature])
        ids = labeled.label_ids(data[ft.label_feature], self.class_names, split)
        rows[split] = labeled.encode_classification(data[ft.text_feature], ids, tok, cfg.seq_len)
      else:
        data = labeled.load_split(ft, split, (ft.prompt_feature, ft.response_feature))
        rows[split] = labeled.encode_prompt_response(data[ft.prompt_feature], data[ft.response_feature], tok,
                                                     cfg.seq_len)
    self.batches = labeled.EpochBatches(rows['train'], cfg.global_batch_size, cfg.seed, pi, pc)
    self.eval_rows = labeled.pad_examples(rows['eval'], cfg.global_batch_size)

  def data_save_arg(self):
    return None if self._grain is None else pipeline.checkpoint_save_arg(self._grain)

  def data_restore_arg(self):
    return None if self._grain is None else pipeline.checkpoint_restore_arg(self._grain)

  def load_pretrained(self, params, source, step: int):
    """`params` with every pretrained leaf replaced by the checkpoint's (onto this mesh)."""
    base = lora.strip_adapters({k: v for k, v in params.items() if k != HEAD})
    restored = source.restore(step, abstract_like(base), params_only=True)
    return _overlay(params, restored)

  def eval_batches(self):
    """Process-local eval batches (classify/prompt: slices of the padded eval rows)."""
    if isinstance(self.eval_rows, list):
      yield from self.eval_rows
      return
    gb, n = self.cfg.global_batch_size, len(self.eval_rows['inputs'])
    local = gb // jax.process_count()
    for s in range(0, n, gb):
      lo = s + jax.process_index() * local
      yield {k: v[lo:lo + local] for k, v in self.eval_rows.items()}

  def save_adapters(self, state, directory: str, step: int, meta: dict):
    """The LoRA adapters (and the head) alone: merge them into the base with fmjax.model.lora.merge."""
    tree = lora.adapter_params(state.params)
    if HEAD in state.params:
      tree[HEAD] = state.params[HEAD]
    ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=False)
    ckpt.save(step, {'params': tree}, {**meta, 'lora': {'rank': self.cfg.finetune.lora_rank,
                                                        'alpha': self.cfg.finetune.lora_alpha}}, force=True)
    ckpt.close()


def _overlay(full, part):
  if isinstance(part, dict):
    return {k: _overlay(v, part[k]) if k in part else v for k, v in full.items()}
  return part


def make_parts(cfg, mesh, tokenizer, compile_step: bool = True) -> Parts:
  return Parts(cfg, mesh, tokenizer, compile_step)


class BestTracker:
  """Keeps the latest and best eval reports, and a copy of the best state in WORKDIR/best."""

  def __init__(self, workdir: str, metric: str, mode: str, meta: dict):
    self.metric, self.mode, self.meta = metric, mode, meta
    self.last = self.best = None
    self.path = os.path.join(workdir, 'best.json')
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.best = json.load(f)
    self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'best'), keep=1, async_save=False)

  def update(self, step: int, report: dict, state) -> bool:
    self.last = dict(report, step=step)
    value = report[self.metric]
    better = self.best is None or (value > self.best[self.metric] if self.mode == 'max' else
                                   value < self.best[self.metric])
    if better:
      self.best = self.last
      self.ckpt.save(step, state, self.meta, force=True)
      if distributed.is_leader():
        with open(self.path, 'w') as f:
          json.dump(self.best, f, indent=2)
    return better

  def close(self):
    self.ckpt.close()


def evaluation(cfg, parts: Parts, workdir: str, meta: dict, writer):
  """`evaluate(state, step) -> scalars` for the loop (writes JSON, PNG, best checkpoint) and its tracker."""
  ft, run = cfg.finetune, parts.run
  classify = ft.task == 'classify'
  tracker = BestTracker(workdir, ft.best_metric if classify else 'loss', ft.best_mode if classify else 'min', meta)
  eval_dir = os.path.join(workdir, 'eval')
  if classify:
    jitted = jax.jit(predict_fn(parts.classifier), out_shardings=shd.replicated(run.mesh),
                     in_shardings=(run.state.shardings.params, {k: run.batch_sharding for k in parts.eval_rows}))
  else:
    eval_step = run.jit_eval_step(jax.numpy.asarray(parts.tokenizer.token_byte_lengths()))

  def evaluate(state, step):
    if not classify:
      totals = {}
      for b in parts.eval_batches():
        for k, v in jax.device_get(eval_step(state.params, loop.to_global(b, run.batch_sharding))).items():
          totals[k] = totals.get(k, 0.0) + float(v)
      out = {'loss': totals['loss_sum'] / max(totals['weight'], 1.0)}
      if totals.get('bytes'):
        out['bits_per_byte'] = totals['loss_sum'] / (math.log(2) * totals['bytes'])
      tracker.update(step, out, state)
      return out
    preds, labels = [], []
    for b in parts.eval_batches():
      with shd.activate(run.mesh, run.rules):
        out = jax.device_get(jitted(state.params, loop.to_global(b, run.batch_sharding)))
      preds.append(out['prediction'][out['valid']])
      labels.append(out['label'][out['valid']])
    cm = task_metrics.confusion_matrix(np.concatenate(labels), np.concatenate(preds), len(parts.class_names))
    report = task_metrics.report(cm, parts.class_names)
    if tracker.update(step, report, state) and distributed.is_leader():
      task_metrics.plot_confusion(report, os.path.join(eval_dir, 'best_confusion.png'),
                                  f'step {step}: macro-F1 {report["macro_f1"]:.3f}')
    if distributed.is_leader():
      task_metrics.write_json(dict(report, step=step), os.path.join(eval_dir, f'step_{step}.json'))
      task_metrics.plot_confusion(report, os.path.join(eval_dir, f'confusion_step_{step}.png'),
                                  f'step {step}: accuracy {report["accuracy"]:.3f}, macro-F1 {report["macro_f1"]:.3f}')
    return task_metrics.scalars(report)

  return evaluate, tracker


def finetune(cfg) -> dict:
  """Fine-tune per `cfg` (resolved); returns {'report', 'best', 'history', 'state', 'last_step'}."""

  check_config(cfg)
  ft, workdir = cfg.finetune, cfg.workdir
  with contextlib.ExitStack() as cleanup:   # closed in reverse: writer, tracker, checkpointer, then the lock
    lock = workdir_lock.lock_for_run(workdir, cfg.force_unlock)   # before anything in the workdir changes
    if lock is not None:
      cleanup.callback(lock.release)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.keep_checkpoints, cfg.async_checkpoints)
    cleanup.callback(ckpt.close)
    latest = ckpt.latest_step()
    if latest is not None:
      checkpoint.check_compatible(ckpt.read_metadata(latest), cfg.model, f'{ckpt.directory}/{latest}')
    changes = train_lib.resume_changes(workdir, cfg, latest is not None, finetune=True)
    if distributed.is_leader():
      config_lib.save(cfg, os.path.join(workdir, 'config.json'))
    source = meta = pretrain_workdir = None
    if ft.init_from:
      source, source_step, pretrain_workdir = find_checkpoint(ft.init_from)
      meta = source.read_metadata(source_step)
      checkpoint.check_compatible(meta, cfg.model, f'{source.directory}/{source_step}')
    tokenizer = load_tokenizer(cfg, meta, pretrain_workdir)
    mesh = shd.make_mesh(cfg.mesh)
    build.check_batch(cfg, mesh)
    start = int(latest or 0)
    writer = train_lib.open_writer(workdir, cfg, start, latest)
    cleanup.callback(writer.close)
    writer.log(f'fmjax.finetune: task {ft.task}; {distributed.describe()}; mesh {shd.describe(mesh)}')
    for line in changes:
      writer.log(line)

    parts = make_parts(cfg, mesh, tokenizer)        # data, model, optimizer, compiled step
    run = parts.run
    extra = {'finetune': ft.to_dict(), 'classes': list(parts.class_names), 'init_from': ft.init_from}
    run_meta = checkpoint.make_metadata(cfg, train_lib.place_tokenizer(tokenizer, workdir), extra)
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

    evaluate, tracker = evaluation(cfg, parts, workdir, run_meta, writer)
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
      parts.save_adapters(result.state, os.path.join(workdir, 'adapters'), result.last_step, run_meta)
  return {'report': tracker.last, 'best': tracker.best, 'history': result.history, 'state': result.state,
          'last_step': result.last_step}


def demo(cfg) -> dict:
  """Fine-tune the same task from cfg.finetune.init_from and from random initialisation; print both."""
  if not cfg.finetune.init_from:
    raise config_lib.ConfigError('--demo needs --config.init_from=PRETRAIN_WORKDIR (pretrain one with: python -m '
                                 'fmjax.train --config configs/default.py --workdir W)')
  reports = {}
  for name, init in (('pretrained', cfg.finetune.init_from), ('random init', '')):
    c = cfg.copy_and_resolve_references()
    c.finetune.init_from = init
    c.workdir = os.path.join(cfg.workdir, name.replace(' ', '_'))
    print(f'== fine-tuning from {name} ({c.workdir})', flush=True)
    reports[name] = finetune(c)['report']
  text = task_metrics.table(reports)
  print(f'\nstdlib package classification, eval split, step {cfg.steps}:\n{text}', flush=True)
  with open(os.path.join(cfg.workdir, 'demo.json'), 'w') as f:
    json.dump(reports, f, indent=2)
  return reports


def main(argv: Sequence[str] | None = None) -> int:
  if argv is None:  # the command line, not a call from Python
    hugepages.reexec_with_hugepages()
  argv = sys.argv[1:] if argv is None else argv
  prog = 'fmjax.finetune'
  try:
    is_demo, config_path, workdir, overrides = parse_args(argv)
    cfg = train_lib.resolve_config(config_path, workdir, overrides)
    check_config(cfg)
    distributed.initialize()
    if is_demo:
      demo(cfg)
    else:
      finetune(cfg)
  except train_lib.user_errors() as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
