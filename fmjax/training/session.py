"""The run lifecycle, one for every objective (pretraining, fine-tuning; later SFT, DPO):

lock the workdir -> the init_from checkpoint (its model adopted) and the workdir's own latest checkpoint
(compatible?) -> resume checks -> config.json -> tokenizer -> mesh -> writers -> build (the objective's,
fmjax/training/objective.py) -> restore or init -> the loop (save, evaluate, stop on SIGTERM / Ctrl-C)
-> the objective's finish -> close in reverse.

Every checkpoint fmjax writes is written here: the run's (WORKDIR/checkpoints), a fine-tune's best
(`BestCheckpoints`, WORKDIR/best) and one-off ones (`write_checkpoint`: LoRA adapters, imported models).
Readers open checkpoints with `Checkpointer.open_for_reading`.

A run that fails to start in a fresh workdir (before its loop: bad data, tokenizer, mesh, build) leaves
nothing behind: what it created there (config.json, checkpoints/, logs, the workdir itself) is removed; a
workdir that held a checkpoint, or a run that reached its loop (a NaN stop keeps its metrics), keeps
everything. A Ctrl-C in the loop saves at the next step boundary, logs one line and raises
`RunInterrupted` (exit code 130); outside the loop it stops at once, saving nothing; a second Ctrl-C
aborts at once (fmjax/training/loop.py `PreemptionWatch`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Sequence

import jax

from fmjax import config as config_lib
from fmjax.checkpoints import lock as workdir_lock
from fmjax.checkpoints import restore, resume
from fmjax.checkpoints import store
from fmjax.data import tokenizers
from fmjax.parallel import sharding as shd
from fmjax.runtime import distributed, elapsed, paths
from fmjax.training import build, loop, numerics
from fmjax.training import writers as metric_writers
from fmjax.training.objective import Objective, Source


class RunInterrupted(KeyboardInterrupt, SystemExit):
  """A run stopped by Ctrl-C, raised once its line is printed and the workdir is closed.

  Python callers catch it as a KeyboardInterrupt; uncaught, the interpreter exits with code 130 and
  prints nothing more (it is a SystemExit). `result`: the loop's, when it stopped with a checkpoint.
  """

  def __init__(self, result: loop.LoopResult | None = None):
    SystemExit.__init__(self, loop.PreemptionWatch.EXIT_CODE)
    self.result = result


def run(cfg, objective: Objective, init_from: str | None = None,
        overrides: Sequence[str] | None = None) -> loop.LoopResult:
  """Train `objective` per `cfg` (resolved) in cfg.workdir; returns the loop's result.

  `init_from`: a checkpoint to start from, whose metadata defines the model (restore.adopt_model):
  `overrides` are the command line's items (a `model.KEY` among them contradicting it is refused; None:
  every field of cfg.model must agree). Raises RunInterrupted after a Ctrl-C.
  """
  watch = loop.PreemptionWatch()
  session = Session(cfg, objective, watch)
  try:
    with session:
      result = session.train(init_from, overrides)
  except RunInterrupted:
    raise
  except KeyboardInterrupt:   # outside the loop: nothing more is saved
    print(f'fmjax: interrupted (Ctrl-C); {session.standing()}', file=sys.stderr, flush=True)
    raise RunInterrupted() from None
  finally:
    watch.close()
  if result.interrupted:
    raise RunInterrupted(result)
  return result


class Session:
  """One run in cfg.workdir. The objective's hooks read its state (cfg, workdir, source, start,
  resumed, tokenizer, mesh, writer, run, meta) and use `log`, `best_checkpoints` and `on_close`."""

  def __init__(self, cfg, objective: Objective, watch: loop.PreemptionWatch):
    self.cfg, self.objective, self.watch = cfg, objective, watch
    self.workdir = cfg.workdir
    self.checkpoint_dir = paths.join(self.workdir, 'checkpoints')
    self.source: Source | None = None
    self.tokenizer = self.mesh = self.writer = self.run = None
    self.meta: dict = {}
    self.start, self.resumed = 0, False
    self._stack = contextlib.ExitStack()
    self._fresh: _FreshStart | None = None   # what existed before the run (set on entering)
    self._holding = False          # this run holds the workdir (as process 0, or as one of the others)
    self._lock = None
    watch.on_abort = self._abort

  def __enter__(self) -> 'Session':
    self._fresh = _FreshStart(self.workdir)
    self._stack.push(self._fresh.remove_created_dirs)   # last of all: the directories this run made, if empty
    try:
      self._lock = workdir_lock.lock_for_run(self.workdir, self.cfg.force_unlock)   # before anything changes
    except BaseException:
      self._stack.__exit__(*sys.exc_info())
      raise
    if self._lock is not None:
      self._stack.callback(self._lock.release)
    self._stack.push(self._fresh.remove_created_files)   # once everything below is closed, under the lock
    self._holding = True
    return self

  def __exit__(self, *exc) -> bool:
    return self._stack.__exit__(*exc)

  def on_close(self, closable):
    """Close `closable` when the run ends (in reverse order of registration); returns it."""
    self._stack.callback(closable.close)
    return closable

  def log(self, line: str) -> None:
    self.writer.log(line)

  def best_checkpoints(self) -> 'BestCheckpoints':
    """The run's WORKDIR/best store (one checkpoint kept, with the run's metadata), closed with the run."""
    return self.on_close(BestCheckpoints(paths.join(self.workdir, 'best'), self.meta))

  def train(self, init_from: str | None, overrides: Sequence[str] | None) -> loop.LoopResult:
    """The lifecycle (the module docstring) inside the held workdir."""
    cfg, objective = self.cfg, self.objective
    if init_from:
      self.source = self._open_source(init_from, overrides)
    ckpt = self.on_close(_writer(self.checkpoint_dir, cfg.keep_checkpoints, cfg.async_checkpoints))
    latest = ckpt.latest_step()
    if latest is not None:  # an incompatible checkpoint fails before anything is compiled
      store.check_compatible(ckpt.read_metadata(latest), cfg.model, f'{ckpt.directory}/{latest}')
    self.start, self.resumed = int(latest or 0), latest is not None
    notes = objective.configure(cfg)
    changes = resume.resume_changes(self.workdir, cfg, self.resumed, finetune=objective.finetune,
                                   step=self.start)
    if distributed.is_leader():   # after the resume checks, which read the saved one
      config_lib.save(cfg, paths.join(self.workdir, 'config.json'))
    self.tokenizer = objective.tokenizer(cfg, self.source)
    tokenizers.check_vocab(self.tokenizer, cfg.model.vocab_size)
    self.mesh = shd.make_mesh(cfg.mesh)
    distributed.check_devices()
    build.check_batch(cfg, self.mesh)
    self.writer = self.on_close(metric_writers.MetricWriter(
        self.workdir, cfg.steps, initial_step=self.start, progress_bar=cfg.progress_bar,
        resume_step=self.start, config=cfg))   # drops records of steps after the checkpoint
    self.log(f'{objective.heading(cfg)}{distributed.describe()}; mesh {shd.describe(self.mesh)}')
    for line in changes + notes:
      self.log(line)
    with elapsed.report(f'compiling the train step on mesh {shd.describe(self.mesh)}'):   # lines past 30 s
      self.run = objective.build(self)
    for line in objective.describe(self):
      self.log(line)
    self.meta = store.make_metadata(cfg, tokenizers.place_in_workdir(self.tokenizer, self.workdir),
                                    objective.metadata(cfg))
    state = self._restore_or_init(ckpt)
    objective.ready(self, state)
    if self.start >= cfg.steps:
      self.log(f'nothing to do: the checkpoint is at step {self.start} and steps={cfg.steps}')
      result = loop.LoopResult(state=state, last_step=self.start)
    else:
      result = self._loop(ckpt, state)
    objective.finish(self, result)
    return result

  def _open_source(self, init_from: str, overrides: Sequence[str] | None) -> Source:
    """The init_from checkpoint, its model adopted into cfg (and what else the objective takes from it)."""
    cfg = self.cfg
    reader, step, workdir = restore.locate_checkpoint(init_from)
    self.on_close(reader)
    source = Source(reader=reader, step=step, workdir=workdir, meta=reader.read_metadata(step))
    explicit = set(cfg.model.keys()) if overrides is None else restore.explicit_model_keys(overrides)
    cfg.model = restore.adopt_model(cfg.model, source.meta, explicit, source.where)
    self.objective.adopt(cfg, source)
    config_lib.validate(cfg)
    return source

  def _restore_or_init(self, ckpt: store.Checkpointer):
    if self.resumed:
      state = ckpt.restore(self.start, self.run.state.abstract)
      self.objective.start_data(self.start, paths.join(ckpt.directory, str(self.start), 'data'))
      self.log(f'resumed from {ckpt.directory}/{self.start}')
      return state
    state = self.run.init(jax.random.PRNGKey(self.cfg.seed))
    self.objective.start_data(0, None)
    if self.source is not None:
      state = self.objective.load_source(self, state)
      self.log(f'initialised from {self.source.where}')
    return state

  def _loop(self, ckpt: store.Checkpointer, state) -> loop.LoopResult:
    cfg, run, objective = self.cfg, self.run, self.objective
    evaluate, eval_every = objective.evaluation(self)
    self._fresh.training = True   # from here a failure keeps the run's logs (a NaN stop, an OOM): no cleanup

    def save(step, state, wait):
      ckpt.save(step, state, self.meta, data_arg=objective.data_save_arg(), force=True)
      if wait:
        ckpt.wait()

    return loop.run_loop(
        train_step=run.train_step, state=state, batches=objective.batches, batch_sharding=run.batch_sharding,
        start_step=self.start, total_steps=cfg.steps, writer=self.writer, model_cfg=cfg.model,
        seq_len=cfg.seq_len, tokens_per_step=cfg.global_batch_size * cfg.seq_len, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, save=save, evaluate=evaluate, eval_every=eval_every,
        cpu_peak_flops=cfg.cpu_peak_flops, compute_dtype=cfg.model.dtype,
        guards=numerics.GuardConfig.from_config(cfg), watch=self.watch)

  def standing(self) -> str:
    """Where the workdir stands after a stop: its last complete checkpoint, or what was removed."""
    steps = store.finalised_steps(self.checkpoint_dir)
    if steps:
      return f'the last complete checkpoint is step {steps[-1]}; rerun the same command to resume from it'
    if self._fresh is not None and self._fresh.removed:
      return f'no checkpoint was written, and what this run created in {self.workdir} is removed'
    return 'no checkpoint was written'

  def _abort(self) -> str:
    """A second Ctrl-C (on the abort thread, the main thread still running): free the workdir now."""
    if self._holding:
      self._fresh.remove_created_files(KeyboardInterrupt, None, None)
      if self._lock is not None:
        self._lock.release()
      self._fresh.remove_created_dirs(KeyboardInterrupt, None, None)
    return f'fmjax: aborted by a second Ctrl-C; {self.standing()}'


class _FreshStart:
  """What a run that fails before its first checkpoint in a fresh workdir removes: what it created."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.before = set(_listdir(workdir))
    self.made = _missing_dirs(workdir)           # the workdir and parents this run will create, innermost first
    self.fresh = not _step_dirs(workdir)         # a started save counts: such a workdir keeps everything
    self.training = False                        # set when the loop starts: its logs are kept
    self.removed = False

  def remove_created_files(self, kind, error, tb) -> bool:
    """On a failure (an ExitStack exit callback): the workdir entries that did not exist before, but the lock."""
    if (kind is None or not self.fresh or self.training or _step_dirs(self.workdir)
        or not distributed.is_leader()):
      return False
    for name in set(_listdir(self.workdir)) - self.before - {workdir_lock.LOCK_FILE}:
      path = paths.join(self.workdir, name)
      with contextlib.suppress(Exception):   # best effort: the failure itself is what is reported
        if paths.isdir(path):
          paths.rmtree(path)
        else:
          paths.remove(path)
    self.removed = True
    return False

  def remove_created_dirs(self, kind, error, tb) -> bool:
    """After the lock is released: the directories this run made, each only if empty."""
    if kind is not None and self.removed:
      for directory in self.made:
        with contextlib.suppress(OSError):
          os.rmdir(directory)
    return False


def _listdir(directory: str) -> list[str]:
  try:
    return paths.listdir(directory) if paths.isdir(directory) else []
  except Exception:  # noqa: BLE001 - an unreadable workdir: nothing known to remove
    return []


def _step_dirs(workdir: str) -> list[str]:
  """The step directories of workdir/checkpoints (finalised or not)."""
  return [n for n in _listdir(paths.join(workdir, 'checkpoints')) if n.isdigit()]


def _missing_dirs(workdir: str) -> list[str]:
  """The local directories from `workdir` up that do not exist yet, innermost first (none for URLs)."""
  out, directory = [], workdir
  while not paths.is_url(directory) and not os.path.exists(directory):
    out.append(directory)
    parent = os.path.dirname(directory)
    if parent == directory:
      break
    directory = parent
  return out


def _writer(directory: str, keep: int | None, async_save: bool) -> store.Checkpointer:
  """The one place fmjax opens a checkpoint directory for writing."""
  return store.Checkpointer(directory, keep, async_save)


class BestCheckpoints:
  """A fine-tune's WORKDIR/best: the best state so far, one kept, written when its tracker says so
  (what 'best' means is the objective's: fmjax/finetune/evaluation.py BestTracker)."""

  def __init__(self, directory: str, meta: dict):
    self.directory, self.meta = directory, meta
    self._ckpt: store.Checkpointer | None = None

  def save(self, step: int, state) -> None:
    if self._ckpt is None:
      self._ckpt = _writer(self.directory, keep=1, async_save=False)
    self._ckpt.save(step, state, self.meta, force=True)
    self._ckpt.wait()   # no save thread left running beside what the run dispatches next (decoding samples)

  def close(self) -> None:
    if self._ckpt is not None:
      ckpt, self._ckpt = self._ckpt, None
      ckpt.close()


def write_checkpoint(directory: str, step: int, state, meta: dict, keep: int | None = None) -> bool:
  """Write one checkpoint of `state` (any tree) and wait for it; False, writing nothing, when `directory`
  already holds `step`. For checkpoints outside a run's loop: LoRA adapters, imported models."""
  ckpt = _writer(directory, keep, async_save=False)
  try:
    if step in ckpt.manager.all_steps():
      return False
    ckpt.save(step, state, meta, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return True
