"""Demo: which standard-library package (asyncio, email, tkinter, multiprocessing) a snippet is from.

Fine-tunes the model of configs/default.py; no download:
  python -m fmjax.train --config configs/default.py --workdir /tmp/pre
  python -m fmjax.finetune --demo --config.init_from=/tmp/pre --workdir /tmp/ft_demo
"""

import os

from fmjax.config import load_config_file


def get_config():
  cfg = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'))
  ft = cfg.finetune
  ft.task = 'classify'
  ft.source = 'stdlib_packages'
  ft.demo_packages = ('asyncio', 'email', 'tkinter', 'multiprocessing')
  ft.demo_per_class = 300
  ft.pooling = 'mean'
  ft.head_learning_rate = 3e-3
  cfg.seq_len = 128
  cfg.global_batch_size = 16
  cfg.steps = 240
  cfg.optim.learning_rate = 1e-3
  cfg.optim.end_learning_rate = 1e-4
  cfg.optim.warmup_steps = 20
  cfg.optim.weight_decay = 0.01
  cfg.log_every = 40
  cfg.eval_every = 80
  cfg.checkpoint_every = 0
  cfg.keep_checkpoints = 1
  return cfg
