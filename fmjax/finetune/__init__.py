"""Fine-tuning: `python -m fmjax.finetune` (classification, continued pretraining, prompt tuning).

  run          finetune(), demo() and the command line
  parts        the task for the shared run builder, labelled data, loading pretrained params
  adaptation   which parameters train and how fast (frozen groups, head LR, LoRA, optimizer)
  classifier   the classification head on the pooled hidden state, its loss and predictions
  schedule     finetune.epochs / warmup_ratio resolved into steps and warmup steps
  splits       train / validation (chooses the best checkpoint) / eval splits
  evaluation   metrics reports, confusion matrices, per-example predictions, the best checkpoint
  summary      the end of a classification run: the model beside the n-gram baseline (summary.json)
  baseline     the bag-of-character-n-grams linear model (scikit-learn)
  predictions  per-example predictions as JSONL (written by evaluation and fmjax.classify)
"""

import importlib

from fmjax.finetune.run import demo, finetune, main

__all__ = ['BestTracker', 'Parts', 'demo', 'finetune', 'main']
_LAZY = {'BestTracker': 'fmjax.finetune.evaluation', 'Parts': 'fmjax.finetune.parts'}


def __getattr__(name: str):
  """BestTracker and Parts, imported on first use: they import jax, and `python -m fmjax.finetune --help`
  (which imports this package) must not."""
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
