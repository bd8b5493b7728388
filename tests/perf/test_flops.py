"""FLOP counting reads each layer's attention score spec: a sliding window caps the keys a query attends."""

import dataclasses

import pytest

from fmjax.model import attention_spec
from fmjax.perf import flops as metrics
from helpers import tiny_config


def test_flops_of_alternating_local_and_global_layers_against_a_hand_count(monkeypatch):
  """Layer 0 attends a window of 4 keys, layer 1 every earlier key (Gemma 2's pattern), at T = 16."""
  cfg = tiny_config(num_heads=4, num_kv_heads=2, d_model=32, mlp_dim=64, vocab_size=64).model
  plain = attention_spec.score_spec
  monkeypatch.setattr(attention_spec, 'score_spec', lambda m, layer=None: dataclasses.replace(
      plain(m, layer), sliding_window=4 if layer == 0 else None))
  # matmuls: q,o 32x32 each; k,v 32x16 each; swiglu 3 x 32x64; 2 layers; head 32x64
  n = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 32 * 64
  # keys per query, T = 16: layer 0 sees 1, 2, 3, then 4 for the 13 later queries; layer 1 sees i + 1
  local = (1 + 2 + 3 + 13 * 4) / 16
  full = sum(range(1, 17)) / 16
  attention = 4 * (local + full) * 4 * 8       # scores and values: 2 matmuls x 2 FLOPs, 4 heads of 8
  assert metrics.flops_per_token(cfg, 16) == pytest.approx(3 * (2 * n + attention), rel=1e-12)
  monkeypatch.undo()
  assert metrics.flops_per_token(cfg, 16) == pytest.approx(3 * (2 * n + 4 * 2 * full * 4 * 8), rel=1e-12)
