"""How long fine-tuning runs and how it warms up: `finetune.epochs` and `finetune.warmup_ratio` resolved
into `steps` and `optim.warmup_steps` once the train split's size is known (before config.json is saved,
so the saved config holds the steps that ran)."""

from __future__ import annotations

import math


def steps_for_epochs(epochs: float, examples: int, global_batch: int) -> int:
  """Optimizer steps that show `examples` train examples `epochs` times in batches of `global_batch`."""
  return max(int(math.ceil(epochs * examples / global_batch)), 1)


def warmup_for_ratio(ratio: float, steps: int) -> int:
  """Warmup steps for a share `ratio` of `steps` (rounded; at least 1 when ratio > 0)."""
  return max(int(round(ratio * steps)), 1)


def resolve(cfg, train_examples: int | None) -> list[str]:
  """Set cfg.steps from finetune.epochs (classify/prompt; `train_examples` = the train split's size) and
  cfg.optim.warmup_steps from finetune.warmup_ratio; returns the log lines saying so."""
  ft, lines = cfg.finetune, []
  if ft.epochs > 0 and train_examples is not None:
    steps = steps_for_epochs(ft.epochs, train_examples, cfg.global_batch_size)
    if steps != cfg.steps:
      lines.append(f'finetune.epochs={ft.epochs:g}: {steps} steps ({train_examples} train examples, batch '
                   f'{cfg.global_batch_size}) instead of steps={cfg.steps} (finetune.epochs=0 uses steps)')
    cfg.steps = steps
  if ft.warmup_ratio > 0:
    warmup = warmup_for_ratio(ft.warmup_ratio, cfg.optim.decay_steps or cfg.steps)
    if warmup != cfg.optim.warmup_steps:
      lines.append(f'finetune.warmup_ratio={ft.warmup_ratio:g}: {warmup} warmup steps instead of '
                   f'optim.warmup_steps={cfg.optim.warmup_steps}')
    cfg.optim.warmup_steps = warmup
  return lines
