"""Weighted mixtures: measured shares, resume, process-count independence, syntax, end to end."""

import json
import logging
import os
import signal
import subprocess

import numpy as np
import pytest

from fmjax import config as config_lib
from fmjax.config import data_defaults
from fmjax.data import mixture, pipeline, stream_set
from fmjax.data.batches import BATCH_KEYS
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import load_tokenizer

TOK = load_tokenizer('byte')
SEQ = 16


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Source 'web': text files of 'w' words; source 'code': JSONL of 'c' words (tokens tell them apart)."""
  root = tmp_path_factory.mktemp('mix')
  (root / 'web').mkdir()
  for i in range(24):
    (root / 'web' / f'{i:02d}.txt').write_text(f'w{i} ' + 'www ' * (3 + i % 7))
  lines = [json.dumps({'text': f'c{i} ' + 'ccc ' * (2 + i % 5)}) for i in range(30)]
  (root / 'code.jsonl').write_text('\n'.join(lines) + '\n')
  return root


def _cfg(root, weights=(0.7, 0.3), **kw):
  cfg = data_defaults()
  cfg.update(cache_dir=str(root / 'cache'), validation_fraction=0.0, add_bos=False, add_eos=False,
             mixture=f'web:{weights[0]}:{root}/web/*.txt,code:{weights[1]}:{root}/code.jsonl')
  cfg.update(kw)
  return cfg


def _iterator(cfg, batch=8, seed=1, **kw):
  return pipeline.make_train_iterator(cfg, TOK, seq_len=SEQ, batch_size=batch, seed=seed, **kw)


def _row_source(row) -> str:
  """Which source a packed row came from, read from its bytes (an independent reference)."""
  text = TOK.decode([t for t in row if t >= 3])
  kinds = {'w' if 'w' in text else None, 'c' if 'c' in text else None} - {None}
  assert len(kinds) == 1, text
  return kinds.pop()


def test_measured_shares_match_the_weights_over_200_batches(corpus):
  it = _iterator(_cfg(corpus))
  rows = [_row_source(r) for _ in range(200) for r in next(it)['inputs']]
  web = rows.count('w') / len(rows)
  assert abs(web - 0.7) < 0.02, web
  assert it.shares()['web'] == pytest.approx(web) and it.rows_seen['code'] == rows.count('c')
  # Every window of 10 batches is close too (low-discrepancy choice, not coin flips).
  for start in range(0, len(rows), 80):
    window = rows[start:start + 80]
    assert abs(window.count('w') - 56) <= 2, start


def test_row_sources_are_a_pure_function_of_seed_and_row():
  weights = [0.5, 0.2, 0.3]
  a = mixture.row_sources(1000, 5000, weights, seed=7)
  assert np.array_equal(a, mixture.row_sources(1000, 5000, weights, seed=7))
  assert np.array_equal(a[100:200], mixture.row_sources(1100, 100, weights, seed=7))   # no state
  assert not np.array_equal(a, mixture.row_sources(1000, 5000, weights, seed=8))
  counts = np.bincount(a, minlength=3) / len(a)
  np.testing.assert_allclose(counts, weights, atol=2e-3)
  # Rows far into a long run are still exact (integer arithmetic, no float drift).
  far = mixture.row_sources(10**15, 5000, weights, seed=7)
  np.testing.assert_allclose(np.bincount(far, minlength=3) / len(far), weights, atol=2e-3)


def _same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_one_and_two_processes_read_the_same_global_batches(corpus):
  cfg = _cfg(corpus, num_streams=2)
  one = _iterator(cfg, batch=8)
  halves = [_iterator(cfg, batch=4, process_index=p, process_count=2) for p in range(2)]
  for _ in range(30):
    whole = next(one)
    parts = [next(h) for h in halves]
    _same([whole], [{k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}])


def test_resume_is_bit_exact_across_process_counts(corpus, tmp_path):
  cfg = _cfg(corpus, num_streams=2)
  ref = _iterator(cfg)
  want = [next(ref) for _ in range(25)]
  # Two processes save their states at step 10, as Grain's checkpoint handler writes them.
  halves = [_iterator(cfg, batch=4, process_index=p, process_count=2) for p in range(2)]
  for _ in range(10):
    for h in halves:
      next(h)
  state_dir = tmp_path / 'data'
  state_dir.mkdir()
  for p, h in enumerate(halves):
    (state_dir / f'process_{p}-of-2.json').write_bytes(h.get_state())
  resumed = _iterator(cfg)
  resumed.set_state(stream_set.read_saved_state(str(state_dir)))
  _same([next(resumed) for _ in range(15)], want[10:])
  assert resumed.rows_seen == {'web': sum(r == 0 for r in mixture.row_sources(0, 200, [0.7, 0.3], 1)),
                               'code': sum(r == 1 for r in mixture.row_sources(0, 200, [0.7, 0.3], 1))}


def test_weights_may_change_on_resume_with_a_notice(corpus, caplog):
  it = _iterator(_cfg(corpus))
  for _ in range(5):
    next(it)
  state = it.get_state()
  changed = _iterator(_cfg(corpus, weights=(0.2, 0.8)))
  with caplog.at_level(logging.WARNING):
    changed.set_state(state)
  assert 'data.mixture changed on resume at step 5' in caplog.text and "'web': 0.2" in caplog.text
  rows = [_row_source(r) for _ in range(50) for r in next(changed)['inputs']]
  assert abs(rows.count('w') / len(rows) - 0.2) < 0.02
  plain = data_defaults()
  plain.update(source='text', files=str(corpus / 'web' / '*.txt'), cache_dir=str(corpus / 'cache'))
  with pytest.raises(DataError, match='saved without data.mixture'):
    changed.set_state(_iterator(plain).get_state())


def test_mixture_syntax():
  sources = mixture.parse('web:0.7:/d/web/*.jsonl.zst, code:3:parquet:/d/code/*, c4:1:tfds:c4/en:3.1.0,s:1:stdlib')
  assert sources == [mixture.Source('web', 0.7, 'jsonl', '/d/web/*.jsonl.zst'),
                     mixture.Source('code', 3.0, 'parquet', '/d/code/*'),
                     mixture.Source('c4', 1.0, 'tfds', 'c4/en:3.1.0'), mixture.Source('s', 1.0, 'stdlib', '')]
  for bad, match in (('web:0.7', 'not NAME:WEIGHT:SPEC'), ('web:-1:x.txt', 'positive number'),
                     ('web:abc:x.txt', 'positive number'), ('a:1:x.txt,a:2:y.txt', 'unique')):
    with pytest.raises(DataError, match=match):
      mixture.parse(bad)
  cfg = config_lib.base_config()
  cfg.data.mixture = 'web:0:x.txt'
  with pytest.raises(config_lib.ConfigError, match=r"data.mixture entry 'web:0:x.txt'"):
    config_lib.validate(cfg)


def _eval_text(batches) -> str:
  return ''.join(TOK.decode([t for t in row if t >= 3]) for b in batches for row in b['inputs'])


def test_mixture_eval_batches_mix_the_sources_validation_splits(corpus):
  cfg = _cfg(corpus, validation_fraction=0.3)
  text = _eval_text(pipeline.make_eval_batches(cfg, TOK, seq_len=SEQ, batch_size=4, num_batches=4))
  assert 'www' in text and 'ccc' in text
  cfg.eval_files = str(corpus / 'code.jsonl')
  text = _eval_text(pipeline.make_eval_batches(cfg, TOK, seq_len=SEQ, batch_size=4, num_batches=2))
  assert text.startswith('c0 ccc ccc c1 ') and 'w' not in text


# ---- end to end through `python -m fmjax.train` (slow) ----

@pytest.mark.slow
def test_sigkill_resume_and_two_processes_train_identically(corpus, tmp_path):
  import test_train_e2e as e2e  # pylint: disable=import-outside-toplevel
  mix = f'--config.data.mixture=web:0.7:{corpus}/web/*.txt,code:0.3:{corpus}/code.jsonl'
  data = {'files': '', 'cache': str(tmp_path / 'cache')}
  args = (mix, '--config.data.num_streams=2', '--config.data.validation_fraction=0.1', *e2e._slow_run(),
          '--config.steps=24', '--config.checkpoint_every=8', '--config.optim.decay_steps=24')
  ref = tmp_path / 'ref'
  assert e2e.train_cli(ref, data, *args, devices=1, env=e2e.SERIAL) == [0]
  run = tmp_path / 'run'
  proc = subprocess.Popen(e2e.command(run, data, *args), env=e2e.base_env(1, **e2e.SERIAL), cwd=e2e.ROOT)
  try:
    assert e2e._wait_for(lambda: 8 in e2e.checkpoints(run) and max(e2e.logged_losses(run), default=0) >= 10,
                         180, proc), 'no checkpoint at step 8 followed by logged steps'
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert e2e.checkpoints(run)[-1] < 24
  assert e2e.train_cli(run, data, *args, devices=1, env=e2e.SERIAL) == [0]
  want, got = e2e.logged_losses(ref), e2e.logged_losses(run)
  for step in range(9, 25):
    assert got[step] == want[step], step          # bit-identical after SIGKILL + resume
  two = tmp_path / 'two'
  assert e2e.train_cli(two, data, *args, processes=2, devices=1, env=e2e.SERIAL) == [0, 0]
  got = e2e.logged_losses(two)
  for step in range(1, 25):
    assert got[step] == pytest.approx(want[step], rel=1e-5), step
  assert os.path.isdir(tmp_path / 'cache')
