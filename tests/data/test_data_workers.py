"""Tokenizing in Grain worker processes changes nothing: same batches and resumable state."""

import json

import numpy as np
import pytest

from fmjax.config import data_defaults
from fmjax.data import pipeline
from fmjax.data.batches import BATCH_KEYS
from fmjax.data.tokenizers import load_tokenizer


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_two_workers_match_in_process(tmp_path):
  for i in range(30):
    (tmp_path / f'{i}.txt').write_text(f'document {i} ' + 'zé😀 ' * (i * 7 % 23))
  cfg = data_defaults()
  cfg.source, cfg.files, cfg.cache_dir = 'text', str(tmp_path / '*.txt'), str(tmp_path / 'cache')
  tok = load_tokenizer('byte')

  def batches(workers, state=None, n=12):
    cfg.worker_count = workers
    it = pipeline.make_train_iterator(cfg, tok, seq_len=16, batch_size=3, seed=5)
    if state is not None:
      it.set_state(state)
    out = [next(it) for _ in range(n)]
    state = json.loads(it.get_state())
    if hasattr(it, 'close'):
      it.close()
    return out, state

  plain, _ = batches(0)
  parallel, state = batches(2, n=4)
  resumed, state = batches(2, state=state, n=4)   # 2 workers -> 2 workers
  resumed0, state = batches(0, state=state, n=2)  # 2 workers -> in-process
  resumed2, _ = batches(2, state=state, n=2)      # in-process -> 2 workers
  assert len(parallel + resumed + resumed0 + resumed2) == len(plain)
  for a, b in zip(plain, parallel + resumed + resumed0 + resumed2):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
