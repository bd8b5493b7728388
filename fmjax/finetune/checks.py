"""Fine-tuning choices that the config schema cannot check (task, pooling, best metric, ranges)."""

from __future__ import annotations

from fmjax import config as config_lib

TASKS = ('classify', 'lm', 'prompt', 'sft', 'dpo')
CLASSIFY_METRICS = ('accuracy', 'macro_precision', 'macro_recall', 'macro_f1')


def check_config(cfg) -> None:
  """Fine-tuning choices that the schema cannot check."""
  ft = cfg.finetune
  choices = {'task': TASKS, 'pooling': ('last', 'mean', 'cls'), 'best_mode': ('max', 'min'),
             'loss_on': ('assistant', 'last_turn'), 'too_long': ('truncate', 'drop'), 'dpo_loss': ('sigmoid', 'ipo'),
             'chat_field': ('', 'messages', 'conversations')}
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
            'validation_fraction': (0 <= ft.validation_fraction < 1, 'in [0, 1)'),
            'dpo_beta': (ft.dpo_beta > 0, '> 0'), 'dpo_label_smoothing': (0 <= ft.dpo_label_smoothing < 0.5, 'in [0, 0.5)'),
            'sample_prompts': (ft.sample_prompts >= 0, '>= 0'), 'sample_tokens': (ft.sample_tokens > 0, '> 0')}
  for key, (ok, allowed) in ranges.items():
    if not ok:
      raise config_lib.ConfigError(f'finetune.{key}={ft[key]} must be {allowed}')
  if ft.task == 'dpo':
    pairs = cfg.global_batch_size // 2
    if cfg.global_batch_size % 2 or pairs % cfg.microbatches:
      raise config_lib.ConfigError(f'finetune.task=dpo trains pairs: global_batch_size={cfg.global_batch_size} must '
                                   f'be even and its {pairs} pairs divisible by microbatches={cfg.microbatches}')
