"""The pieces of a fine-tuning run: its task (head, loss, optimizer) for the shared run builder,
its labelled data, loading the pretrained parameters, and saving LoRA adapters."""

from __future__ import annotations

import jax

from fmjax import build, checkpoint
from fmjax.checkpoint import abstract_like
from fmjax.data import labeled, pipeline
from fmjax.finetune import adaptation
from fmjax.finetune.classifier import HEAD, Classifier, loss_fn
from fmjax.model import lora


def task(cfg, num_classes: int = 0) -> build.Task:
  """The fine-tuning task for `build.build_run`: LoRA in the model, the grouped optimizer, and for
  classification a head on the pooled hidden state with its loss."""
  ft = cfg.finetune
  model_cfg = lora.with_lora(cfg.model, ft.lora_rank, ft.lora_alpha, ft.lora_targets) if ft.lora_rank else None
  head = dict(params=lambda model, rng: Classifier(model, num_classes, ft.pooling).init(rng, cfg.seq_len),
              loss=lambda model: loss_fn(Classifier(model, num_classes, ft.pooling))) if ft.task == 'classify' else {}
  return build.Task(model_cfg=model_cfg, optimizer=adaptation.make_optimizer,
                    packed=ft.task == 'lm' and cfg.data.packing, **head)


class Parts:
  """What `finetune` needs beyond the shared loop: the Run, data, loading, evaluation hooks."""

  def __init__(self, cfg, mesh, tokenizer, compile_step: bool = True):
    self.cfg, self.tokenizer, ft = cfg, tokenizer, cfg.finetune
    self.class_names, self.classifier, self.eval_rows, self._grain = (), None, None, None
    self._load_data()
    self.run = build.build_run(cfg, mesh, task(cfg, len(self.class_names)), compile_step=compile_step)
    if ft.task == 'classify':
      self.classifier = Classifier(self.run.model, len(self.class_names), ft.pooling)
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

