"""A tiny model for end-to-end CLI tests; point it at data with --config.data.files=GLOB."""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(vocab_size=264, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_seq_len=32))
  cfg.data.source = 'text'
  cfg.data.validation_fraction = 0.2
  cfg.data.num_streams = 2
  cfg.seq_len = 32
  cfg.global_batch_size = 8
  cfg.steps = 8
  cfg.optim.warmup_steps = 2
  cfg.optim.decay_steps = 8   # fixed, so a run stopped at step 4 follows the same schedule
  cfg.log_every = 1
  cfg.checkpoint_every = 4
  cfg.progress_bar = False
  return cfg
