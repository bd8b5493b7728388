"""What a run trains, as the run lifecycle (fmjax/training/session.py) sees it.

The session does everything every run does (lock, checkpoints, config.json, tokenizer, mesh,
writers, restore-or-init, the loop, closing); an `Objective` supplies the rest through the hooks
below, each called once, in this order. Pretraining (`Pretraining`, here) and fine-tuning
(fmjax/finetune/parts.py `FineTuning`) are the two objectives; SFT or DPO would be a third: their
data, loss (a `build.Task`), evaluation and what 'best' means, nothing of the lifecycle.

  adopt(cfg, source)            the init_from checkpoint's model is adopted: take what else it defines
  configure(cfg) -> [lines]     before config.json: settle what depends on the data (e.g. epochs -> steps)
  tokenizer(cfg, source)        the run's tokenizer (checked against the vocabulary by the session)
  build(session) -> Run         the compiled run (fmjax/training/build.py) and `self.batches`, the train
                                data iterator, once the mesh and writer exist
  describe(session) -> [lines]  logged once built
  metadata(cfg) -> dict         extra checkpoint metadata
  load_source(session, state)   a fresh run's state with the init_from checkpoint's parameters
  start_data(step, directory)   the train data positioned at `step` (directory: the checkpoint's data item)
  ready(session, state)         the starting state is there, fresh or resumed (DPO's reference log-probs)
  data_save_arg()               the data item a checkpoint saves (None: the step alone positions the data)
  evaluation(session)           (evaluate(state, step) -> scalars, or None; eval_every)
  finish(session, result)       after the loop (or a run with nothing to do): adapters, summaries
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax

from fmjax.checkpoints import restore
from fmjax.checkpoints.store import Checkpointer, CheckpointError


@dataclass
class Source:
  """The checkpoint a run starts from (`init_from`), opened for reading; its metadata defines the model."""
  reader: Checkpointer
  step: int
  workdir: str        # the workdir holding it (a tokenizer file is named relative to it)
  meta: dict

  @property
  def where(self) -> str:
    return f'{self.reader.directory}/{self.step}'

  def tokenizer_path(self, default: str | None) -> str:
    """The checkpoint's tokenizer as a data.tokenizer value ('byte' or a file); `default` when it names none."""
    spec = self.meta.get('tokenizer', default)
    if not spec:
      raise CheckpointError(f'{self.where} records no tokenizer: import the model again with one '
                            '(fmjax-convert from-hf --tokenizer byte|FILE)')
    return restore.tokenizer_path(self.workdir, spec)

  def params(self, abstract_params):
    """The checkpoint's parameters, read onto the shardings of `abstract_params`."""
    return self.reader.restore(self.step, abstract_params, params_only=True)


class Objective:
  """The hooks of one kind of run (see the module docstring); the defaults do nothing extra."""

  finetune = False    # resume checks read the saved config as a fine-tune's (fmjax/checkpoints/resume.py)
  batches = None      # this process's train batches, set by build()

  def heading(self, cfg) -> str:
    """The start of the run's first log line (the session adds the processes and the mesh)."""
    return 'fmjax: '

  def adopt(self, cfg, source: Source) -> None:
    pass

  def configure(self, cfg) -> list[str]:
    return []

  def tokenizer(self, cfg, source: Source | None):
    from fmjax.data import tokenizers  # pylint: disable=import-outside-toplevel
    return tokenizers.load_tokenizer(cfg.data.tokenizer)

  def build(self, session):
    raise NotImplementedError

  def describe(self, session) -> list[str]:
    return []

  def metadata(self, cfg) -> dict:
    return {}

  def load_source(self, session, state):
    return state.replace(params=session.source.params(session.run.state.abstract.params))

  def start_data(self, step: int, directory: str | None) -> None:
    pass

  def ready(self, session, state) -> None:
    pass

  def data_save_arg(self) -> Any:
    return None

  def evaluation(self, session) -> tuple[Callable | None, int]:
    return None, 0

  def finish(self, session, result) -> None:
    pass


class Pretraining(Objective):
  """Next-token prediction (decoders) or masked-LM (model.kind='encoder') on cfg.data; eval on its
  validation split every eval_every steps, and the lm-eval tasks of eval_tasks every eval_tasks_every
  (fmjax/training/downstream.py). With init_from, the checkpoint's tokenizer too."""

  def adopt(self, cfg, source: Source) -> None:
    cfg.data.tokenizer = source.tokenizer_path(default=cfg.data.tokenizer)

  def configure(self, cfg) -> list[str]:
    from fmjax.data import documents  # pylint: disable=import-outside-toplevel
    from fmjax.training import downstream  # pylint: disable=import-outside-toplevel
    if cfg.data.files and not cfg.data.mixture and cfg.data.source != 'tfds':
      documents.resolve_files(cfg.data.files)   # a glob that matches nothing: one line before any output
    if cfg.data.eval_files and not cfg.data.mixture:
      documents.resolve_files(cfg.data.eval_files, 'data.eval_files')
    downstream.check(cfg)   # lm-eval installed, every task name known: before anything is compiled
    return []

  def build(self, session):
    from fmjax.data import pipeline  # pylint: disable=import-outside-toplevel
    from fmjax.training import build  # pylint: disable=import-outside-toplevel
    cfg = session.cfg
    part, parts = _feed(session)
    self.batches = pipeline.make_train_iterator(cfg.data, session.tokenizer, seq_len=cfg.seq_len,
                                                batch_size=cfg.global_batch_size // parts,
                                                seed=cfg.seed, process_index=part, process_count=parts)
    if cfg.eval_every:
      pipeline.check_eval_split(cfg.data)   # an empty validation split is found before compiling
    return build.build_lm_run(cfg, session.mesh)

  def describe(self, session) -> list[str]:
    from fmjax.training.state import param_count  # pylint: disable=import-outside-toplevel
    from fmjax.perf import flops  # pylint: disable=import-outside-toplevel
    run = session.run
    total = param_count(run.state.abstract.params)
    inactive = flops.inactive_params(session.cfg.model)
    active = f' ({(total - inactive) / 1e6:.2f}M active per token)' if inactive else ''
    lines = [f'model: {total / 1e6:.2f}M parameters{active}; train step compiled in {run.compile_seconds:.1f}s']
    memory = run.train_step.memory_analysis()
    if memory is not None:
      lines.append(f'per-device memory: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, '
                   f'temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB')
    from fmjax.training import optim  # pylint: disable=import-outside-toplevel
    from fmjax.training import downstream  # pylint: disable=import-outside-toplevel
    cfg = session.cfg
    return (lines + optim.describe(cfg.optim, cfg.steps, run.state.abstract.params, run.state.abstract.opt_state)
            + downstream.describe(cfg))

  def metadata(self, cfg) -> dict:
    from fmjax.training import optim  # pylint: disable=import-outside-toplevel
    return {'optim': optim.summary(cfg.optim, cfg.steps)}   # the optimizer and schedule as used

  def start_data(self, step: int, directory: str | None) -> None:
    from fmjax.data import stream_set  # pylint: disable=import-outside-toplevel
    if directory is not None:
      self.batches.set_state(stream_set.read_saved_state(directory))

  def data_save_arg(self):
    from fmjax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.checkpoint_save_arg(self.batches)

  def evaluation(self, session):
    from fmjax.training import downstream  # pylint: disable=import-outside-toplevel
    return downstream.evaluation(session, *self._eval_split(session))

  def _eval_split(self, session):
    """(evaluate, eval_every) of the validation split."""
    cfg = session.cfg
    if not cfg.eval_every:
      return None, 0
    from fmjax.data import pipeline  # pylint: disable=import-outside-toplevel
    from fmjax.inference import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
    part, parts = _feed(session)
    eval_batches = pipeline.make_eval_batches(cfg.data, session.tokenizer, seq_len=cfg.seq_len,
                                              batch_size=cfg.global_batch_size // parts,
                                              num_batches=cfg.eval_batches, process_index=part,
                                              process_count=parts)
    evaluator = evaluate_lib.make_evaluator(session.run, session.tokenizer.token_byte_lengths())
    return (lambda state, step: evaluator(state.params, eval_batches)), cfg.eval_every


def _feed(session) -> tuple[int, int]:
  """(part, parts) of the global batch this process loads (`sharding.batch_feed`): processes that hold the
  same rows (the sequence axis across processes) load the same documents."""
  if jax.process_count() == 1:
    return 0, 1
  from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
  return shd.batch_feed(shd.batch_sharding(session.mesh, shd.axis_rules(session.cfg)))
