"""CPU-sized default: a small LLaMA-style model on the Python standard library's own source.

Runs anywhere with no download: `python -m fmjax.train --config configs/default.py --workdir DIR`.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(vocab_size=259, d_model=128, num_layers=4, num_heads=4, mlp_dim=384,
                        max_seq_len=128))
  cfg.data.source = 'stdlib'
  cfg.data.tokenizer = 'byte'
  cfg.seq_len = 128
  cfg.global_batch_size = 16
  cfg.steps = 600
  cfg.optim.learning_rate = 2e-3
  cfg.optim.end_learning_rate = 2e-4
  cfg.optim.warmup_steps = 50
  cfg.log_every = 20
  cfg.eval_every = 200
  cfg.checkpoint_every = 200
  return cfg
