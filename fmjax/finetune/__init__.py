"""Fine-tuning: `python -m fmjax.finetune` (classification, continued pretraining, prompt tuning).

  run          finetune(), demo() and the command line
  parts        the task for the shared run builder, labelled data, loading pretrained params
  adaptation   which parameters train and how fast (frozen groups, head LR, LoRA, optimizer)
  classifier   the classification head on the pooled hidden state, its loss and predictions
  evaluation   metrics reports, confusion matrices, the best checkpoint
"""

from fmjax.finetune.evaluation import BestTracker
from fmjax.finetune.parts import Parts
from fmjax.finetune.run import demo, finetune, main

__all__ = ['BestTracker', 'Parts', 'demo', 'finetune', 'main']
