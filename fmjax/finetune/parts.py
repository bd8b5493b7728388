"""The pieces of a fine-tuning run: its task (head, loss, optimizer) for the shared run builder,
its labelled data, loading the pretrained parameters, saving LoRA adapters, and `FineTuning`, the
objective the run lifecycle (fmjax/training/session.py) trains."""

from __future__ import annotations

import jax

from fmjax.training import build, session
from fmjax.training.objective import Objective
from fmjax.checkpoints import store as checkpoint
from fmjax.checkpoints.store import abstract_like
from fmjax.data import labeled, pipeline, stream_set, tokenizers
from fmjax.finetune import adaptation, chat, evaluation, reference, schedule, splits, summary
from fmjax.objectives import preference
from fmjax.objectives.classification import HEAD, Classifier, loss_fn
from fmjax.model import lora
from fmjax.runtime import distributed, paths


def task(cfg, num_classes: int = 0) -> build.Task:
  """The fine-tuning task for `build.build_run`: LoRA in the model, the grouped optimizer, and for
  classification a head on the pooled hidden state with its loss."""
  ft = cfg.finetune
  model_cfg = lora.with_lora(cfg.model, ft.lora_rank, ft.lora_alpha, ft.lora_targets) if ft.lora_rank else None
  head = dict(params=lambda model, rng: make_classifier(cfg, model, num_classes).init(rng, cfg.seq_len),
              loss=lambda model: loss_fn(make_classifier(cfg, model, num_classes))) if ft.task == 'classify' else {}
  if ft.task == 'dpo':   # pairs of whole rows, the frozen reference's log-probabilities in the batch
    head = dict(loss=lambda model: preference.dpo_loss_fn(model, ft.dpo_beta, ft.dpo_label_smoothing, ft.dpo_loss),
                extra_keys=(preference.REFERENCE_KEY,))
  return build.Task(model_cfg=model_cfg, optimizer=adaptation.make_optimizer,
                    packed=ft.task in ('lm', 'sft') and cfg.data.packing, **head)


def make_classifier(cfg, model, num_classes: int) -> Classifier:
  """The classification head of the finetune config on `model`."""
  ft = cfg.finetune
  return Classifier(model, num_classes, ft.pooling, dropout=ft.classifier_dropout, seed=cfg.seed)


class Parts:
  """What `finetune` needs beyond the shared loop: the Run, data, loading, evaluation hooks.

  `data` (classify/prompt) is the run's `splits.LabeledData`, loaded from cfg.finetune when None.
  `eval_rows` / `validation_rows` are the encoded eval and validation splits (validation None when off).
  """

  task = staticmethod(task)   # the fine-tuning task of a config (fmjax/finetune/chat_eval.py builds with it)

  def __init__(self, cfg, mesh, tokenizer, compile_step: bool = True,
               data: splits.LabeledData | chat.ChatData | None = None):
    self.cfg, self.tokenizer, ft = cfg, tokenizer, cfg.finetune
    self.class_names, self.classifier, self._grain, self.template = (), None, None, None
    self.data, self.eval_rows, self.validation_rows = data, None, None
    self._load_data()
    self.run = build.build_run(cfg, mesh, task(cfg, len(self.class_names)), compile_step=compile_step)
    if ft.task == 'classify':
      self.classifier = make_classifier(cfg, self.run.model, len(self.class_names))
    self.trainable_summary = adaptation.trainable_summary(self.run.state.abstract.params, cfg)

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
    if ft.task in chat.CHAT_TASKS:
      self._load_chat()
      return
    if self.data is None:
      self.data = splits.load(ft)
    self.class_names = self.data.class_names
    train = self._encode(self.data.train)
    self.batches = labeled.EpochBatches(train, cfg.global_batch_size, cfg.seed, pi, pc)
    self.eval_rows = labeled.pad_examples(self._encode(self.data.eval), cfg.global_batch_size)
    if self.data.validation is not None:
      self.validation_rows = labeled.pad_examples(self._encode(self.data.validation), cfg.global_batch_size)

  def _load_chat(self):
    """sft: packed rows of conversations; dpo: pair rows (reference log-probabilities set by `set_reference`)."""
    cfg, ft = self.cfg, self.cfg.finetune
    pi, pc, gb = jax.process_index(), jax.process_count(), cfg.global_batch_size
    self.data = self.data or chat.load(ft)
    self.template = chat.template_for(ft, self.tokenizer)
    if ft.task == 'sft':
      self.batches = labeled.EpochBatches(chat_rows(cfg, self.data, self.template, 'train'), gb, cfg.seed, pi, pc)
      self.eval_rows = labeled.pad_examples(chat_rows(cfg, self.data, self.template, 'eval'), gb)
      if self.data.validation is not None:
        self.validation_rows = labeled.pad_examples(chat_rows(cfg, self.data, self.template, 'validation'), gb)
      return
    pairs = {name: chat.PairRows(*chat.encode_pairs(ft, getattr(self.data, name), self.template, cfg.seq_len, name))
             for name in ('train', 'eval', 'validation') if getattr(self.data, name) is not None}
    self.pairs = pairs
    self.batches = chat.PairBatches(pairs['train'].chosen, pairs['train'].rejected, gb, cfg.seed, pi, pc)
    self.eval_rows, self.validation_rows = pairs['eval'], pairs.get('validation')

  def set_reference(self, workdir: str, resumed: bool, params, log) -> None:
    """dpo: the reference log-probabilities of every pair (fmjax/finetune/reference.py) into the batches."""
    named = {f'{split}_{side}': getattr(rows, side) for split, rows in self.pairs.items()
             for side in ('chosen', 'rejected')}
    logps = reference.load_or_compute(workdir, resumed, self.run, params, named, log)
    for split, rows in self.pairs.items():
      rows.reference = (logps[f'{split}_chosen'], logps[f'{split}_rejected'])
    self.batches.reference = self.pairs['train'].reference

  def _encode(self, split: splits.Split) -> dict:
    ft, cfg = self.cfg.finetune, self.cfg
    if ft.task == 'classify':
      return labeled.encode_classification(split.columns[ft.text_feature], split.ids, self.tokenizer, cfg.seq_len)
    return labeled.encode_prompt_response(split.columns[ft.prompt_feature], split.columns[ft.response_feature],
                                          self.tokenizer, cfg.seq_len)

  def data_save_arg(self):
    """The data item of a checkpoint: the stream state (task lm); None: the step positions the epochs."""
    return None if self._grain is None else pipeline.checkpoint_save_arg(self._grain)

  def start_data(self, step: int, directory: str | None) -> None:
    """Position the train batches at `step` (`directory`: the checkpoint's data item when resuming)."""
    if self._grain is None:
      self.batches.start(step)
    elif directory is not None:
      self._grain.set_state(stream_set.read_saved_state(directory))

  def load_pretrained(self, params, source, step: int):
    """`params` with every pretrained leaf replaced by the checkpoint's (onto this mesh)."""
    base = lora.strip_adapters({k: v for k, v in params.items() if k != HEAD})
    restored = source.restore(step, abstract_like(base), params_only=True)
    return _overlay(params, restored)

  def eval_batches(self, rows=None):
    """Process-local batches of the eval split (or of `rows`, e.g. validation_rows; classify/prompt:
    slices of the padded rows)."""
    rows = self.eval_rows if rows is None else rows
    if isinstance(rows, chat.PairRows):
      yield from chat.pair_eval_batches(rows.chosen, rows.rejected, rows.reference, self.cfg.global_batch_size,
                                        jax.process_index(), jax.process_count())
      return
    if isinstance(rows, list):
      yield from rows
      return
    gb, n = self.cfg.global_batch_size, len(rows['inputs'])
    local = gb // jax.process_count()
    for s in range(0, n, gb):
      lo = s + jax.process_index() * local
      yield {k: v[lo:lo + local] for k, v in rows.items()}

  def save_adapters(self, state, directory: str, step: int, meta: dict):
    """The LoRA adapters (and the head) alone: merge them into the base with fmjax.model.lora.merge."""
    tree = lora.adapter_params(state.params)
    if HEAD in state.params:
      tree[HEAD] = state.params[HEAD]
    session.write_checkpoint(directory, step, {'params': tree}, {**meta, 'lora': {
        'rank': self.cfg.finetune.lora_rank, 'alpha': self.cfg.finetune.lora_alpha}}, keep=1)


def _overlay(full, part):
  if isinstance(part, dict):
    return {k: _overlay(v, part[k]) if k in part else v for k, v in full.items()}
  return part


class FineTuning(Objective):
  """Fine-tuning (finetune.task classify, lm or prompt) for the run lifecycle: the labelled splits and the
  schedule they imply, the pretrained checkpoint's tokenizer and parameters, the task's evaluation and
  best checkpoint (fmjax/finetune/evaluation.py), LoRA adapters and the classification summary at the end.
  After the run: `tracker` (last and best reports) and `summary` (classify)."""

  finetune = True

  def __init__(self):
    self.data = self.parts = self.baseline = self.tracker = self.summary = self._source = None

  def heading(self, cfg) -> str:
    return f'fmjax.finetune: task {cfg.finetune.task}; '

  def adopt(self, cfg, source) -> None:
    checkpoint.check_compatible(source.meta, cfg.model, source.where)
    self._source = source

  def configure(self, cfg) -> list[str]:
    from fmjax.finetune.checks import check_config  # pylint: disable=import-outside-toplevel
    check_config(cfg)   # again: the model may be the checkpoint's now
    ft = cfg.finetune
    if ft.task in chat.CHAT_TASKS:   # epochs count packed rows (sft) or pairs (dpo: two rows each)
      self.data = chat.load(ft)
      if ft.task == 'sft':
        template = chat.template_for(ft, self.tokenizer(cfg, self._source))
        rows = len(chat_rows(cfg, self.data, template, 'train')['inputs'])
      else:
        rows = 2 * len(self.data.train)
      return schedule.resolve(cfg, rows) + _describe_chat(self.data, rows, ft.task)
    self.data = splits.load(ft) if ft.task != 'lm' else None   # its size sets the steps of finetune.epochs
    notes = schedule.resolve(cfg, None if self.data is None else len(self.data.train))
    return notes + _describe_splits(self.data)

  def tokenizer(self, cfg, source):
    """The checkpoint's tokenizer (with init_from), else data.tokenizer."""
    return tokenizers.load_tokenizer(source.tokenizer_path('byte') if source else cfg.data.tokenizer)

  def build(self, s):
    ft = s.cfg.finetune
    if ft.task == 'classify' and ft.baseline and distributed.is_leader():
      self.baseline = summary.fit_baseline(ft, self.data, s.log)
    self.parts = Parts(s.cfg, s.mesh, s.tokenizer, data=self.data)   # model, optimizer, compiled step
    self.batches = self.parts.batches
    return self.parts.run

  def describe(self, s) -> list[str]:
    return [f'trainable: {self.parts.trainable_summary}; step compiled in {self.parts.run.compile_seconds:.1f}s']

  def metadata(self, cfg) -> dict:
    ft = cfg.finetune
    return {'finetune': ft.to_dict(), 'classes': list(self.parts.class_names), 'init_from': ft.init_from}

  def load_source(self, s, state):
    return state.replace(params=self.parts.load_pretrained(state.params, s.source.reader, s.source.step))

  def start_data(self, step: int, directory: str | None) -> None:
    self.parts.start_data(step, directory)

  def ready(self, s, state) -> None:
    if s.cfg.finetune.task == 'dpo':   # the starting parameters are the reference (kept for a resume)
      self.parts.set_reference(s.workdir, s.resumed, state.params, s.log)

  def data_save_arg(self):
    return self.parts.data_save_arg()

  def evaluation(self, s):
    self.tracker = s.on_close(evaluation.best_tracker(s.cfg, self.parts, s.workdir, s.meta))
    evaluate = evaluation.evaluation(s.cfg, self.parts, s.workdir, self.tracker, s.writer, self.baseline)
    return evaluate, s.cfg.eval_every or s.cfg.steps

  def finish(self, s, result) -> None:
    ft = s.cfg.finetune
    if ft.lora_rank and distributed.is_leader():
      self.parts.save_adapters(result.state, paths.join(s.workdir, 'adapters'), result.last_step, s.meta)
    if self.tracker is None:   # nothing was left to train: the reports of the runs before
      self.tracker = s.on_close(evaluation.best_tracker(s.cfg, self.parts, s.workdir, s.meta))
    if ft.task == 'classify':
      self.summary = summary.summarize(self.tracker, self.baseline, result.last_step)
      if distributed.is_leader():
        summary.write_summary(paths.join(s.workdir, 'summary.json'), self.summary)
        s.log(summary.tables(self.summary))

  def outcome(self, result) -> dict:
    """finetune()'s answer (see fmjax/finetune/run.py)."""
    last = self.tracker.last
    if last is not None and 'eval' in last:   # validation chose: the eval split's report of the last step
      last = last['eval']
    return {'report': last, 'best': self.tracker.best, 'summary': self.summary, 'history': result.history,
            'state': result.state, 'last_step': result.last_step}


def chat_rows(cfg, data: chat.ChatData, template, split: str) -> dict:
  """The encoded sft rows of one split, encoded once (configure counts the train rows for the epochs)."""
  if split not in data.rows:
    data.rows[split] = chat.encode_sft(cfg.finetune, getattr(data, split), template, cfg.seq_len, cfg.data.packing,
                                       split)
  return data.rows[split]


def _describe_chat(data: chat.ChatData, rows: int, task: str) -> list[str]:
  held = (f'{len(data.validation)} validation ({data.validation_from}; chooses the best checkpoint)'
          if data.validation is not None else 'no validation')
  unit = 'conversations' if task == 'sft' else 'pairs'
  packed = f' ({rows} rows)' if task == 'sft' else ''
  return [f'{unit}: {len(data.train)} train{packed}, {held}, {len(data.eval)} eval (reported)']


def _describe_splits(data) -> list[str]:
  if data is None:
    return []
  held = (f'{len(data.validation)} validation ({data.validation_from}; chooses the best checkpoint)'
          if data.validation is not None else 'no validation')
  return [f'examples: {len(data.train)} train, {held}, {len(data.eval)} eval (reported)']
