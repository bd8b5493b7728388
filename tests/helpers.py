"""Shared test fixtures: tiny configs and synthetic batches."""

import numpy as np

from fmjax import config


def tiny_config(**model_overrides):
  """A run config for a model small enough to train in a test on CPU."""
  cfg = config.base_config()
  cfg.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_seq_len=16))
  cfg.model.update(model_overrides)
  cfg.seq_len = 16
  cfg.global_batch_size = 8
  cfg.optim.warmup_steps = 2
  cfg.steps = 10
  cfg.progress_bar = False
  return cfg


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0, packed: bool = False) -> dict:
  """A deterministic LM batch in fmjax's format; with `packed`, two documents per row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(batch, seq_len + 1)).astype(np.int32)
  seg = np.ones((batch, seq_len), np.int32)
  pos = np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))
  if packed:
    cut = seq_len // 2
    seg[:, cut:] = 2
    pos[:, cut:] -= cut
  weights = np.ones((batch, seq_len), np.float32)
  if packed:
    weights[:, cut - 1] = 0.0
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': seg, 'positions': pos,
          'weights': weights}
