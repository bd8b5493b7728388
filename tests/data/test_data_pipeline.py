"""The Grain pipeline: batch format invariants, determinism, resume, sharding, eval batches."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmjax.config import data_defaults
from fmjax.data import builders, pipeline
from fmjax.data.batches import BATCH_KEYS
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import load_tokenizer

SEQ, BATCH = 32, 4
TOK = load_tokenizer('byte')


def _docs(n=60):
  return [f'doc{i:02d} ' + 'abc é日😀 '[: i % 11] * (i % 9) + 'x' * (i * 13 % 70) for i in range(n)]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  docs = _docs()
  for i, doc in enumerate(docs):
    (root / f'{i:03d}.txt').write_text(doc, encoding='utf-8')
  cfg = data_defaults()
  cfg.source, cfg.files, cfg.cache_dir = 'text', str(root / '*.txt'), str(root / 'cache')
  cfg.validation_fraction = 0.2
  return cfg, docs


def _cfg(corpus, **kw):
  cfg = corpus[0].copy_and_resolve_references()
  cfg.update(kw)
  return cfg


def _train(cfg, seed=0, **kw):
  return pipeline.make_train_iterator(cfg, TOK, seq_len=kw.pop('seq_len', SEQ), batch_size=kw.pop('batch_size', BATCH),
                                      seed=seed, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)


def _check_invariants(batch):
  assert set(batch) == set(BATCH_KEYS)
  for key in BATCH_KEYS:
    assert batch[key].shape == (BATCH, SEQ)
    assert batch[key].dtype == (np.float32 if key == 'weights' else np.int32)
  inputs, targets, seg, pos, w = (batch[k] for k in BATCH_KEYS)
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  cont = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  np.testing.assert_array_equal(pos[:, 1:][cont], pos[:, :-1][cont] + 1)
  np.testing.assert_array_equal(pos[:, 1:][~cont], 0)
  np.testing.assert_array_equal(w[:, :-1], cont.astype(np.float32))  # 0 across boundaries
  assert not w[seg == 0].any() and not inputs[seg == 0].any()        # padding: pad id, weight 0
  assert ((seg[:, 1:] == seg[:, :-1]) | (seg[:, 1:] == seg[:, :-1] + 1) | (seg[:, 1:] == 0)).all()


def _rows(batches):
  """The full L+1 token rows and their segment ids."""
  return [(np.concatenate([b['inputs'][r], b['targets'][r, -1:]]), b['segment_ids'][r], b['weights'][r])
          for b in batches for r in range(len(b['inputs']))]


def test_packed_batches_invariants_and_content(corpus):
  cfg, docs = corpus
  train = builders.open_split(cfg, 'train')
  batches = _take(_train(cfg), 40)
  for b in batches:
    _check_invariants(b)
  stream = np.concatenate([row for row, _, _ in _rows(batches)])  # concat-then-split: no gaps
  assert stream[0] == TOK.bos_id
  # Cut the stream at eos: every complete piece is bos + one train document.
  cuts = np.flatnonzero(stream == TOK.eos_id)
  pieces = [stream[a + 1:b + 1] for a, b in zip(cuts[:-1], cuts[1:])]
  train_docs = {train[i] for i in range(len(train))}
  assert len(pieces) > len(train_docs)  # more than one epoch
  for piece in pieces:
    assert piece[0] == TOK.bos_id and piece[-1] == TOK.eos_id
    assert TOK.decode(piece) in train_docs
  epoch = [TOK.decode(p) for p in pieces[:len(train_docs) - 1]]
  assert len(set(epoch)) == len(epoch)  # no repeats within an epoch


def test_padding_mode(corpus):
  cfg = _cfg(corpus, packing=False)
  batches = _take(_train(cfg), 10)
  for b in batches:
    _check_invariants(b)
    assert (b['segment_ids'] <= 1).all()
    assert (b['inputs'][:, 0] == TOK.bos_id).all()
  lengths = [(b['segment_ids'] > 0).sum(1) for b in batches]
  assert np.concatenate(lengths).max() == SEQ and np.concatenate(lengths).min() < SEQ  # truncated and padded


def test_determinism_and_seed(corpus):
  cfg = corpus[0]
  assert _same(_take(_train(cfg, 3), 5), _take(_train(cfg, 3), 5))
  assert not _same(_take(_train(cfg, 3), 5), _take(_train(cfg, 4), 5))


@pytest.mark.parametrize('packing', [True, False])
def test_resume_from_state(corpus, packing):
  cfg = _cfg(corpus, packing=packing)
  it = _train(cfg)
  for k in (0, 1, 4):
    _take(it, k)
    state = json.loads(it.get_state())
    expected = _take(it, 3)
    fresh = _train(cfg)
    fresh.set_state(state)
    assert _same(_take(fresh, 3), expected)


def test_resume_with_orbax_checkpoint_manager(corpus, tmp_path):
  cfg = corpus[0]
  it = _train(cfg)
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=pipeline.checkpoint_save_arg(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  fresh = _train(cfg)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    assert mngr.latest_step() == 3
    mngr.restore(3, args=ocp.args.Composite(data=pipeline.checkpoint_restore_arg(fresh)))
  assert _same(_take(fresh, 3), expected)


def _epoch_docs(cfg, process_index, process_count):
  """The documents of one epoch of a shard (padding mode, rows long enough for any document)."""
  seq = 256
  docs = pipeline._shard_documents(cfg, 'train', process_index, process_count)  # pylint: disable=protected-access
  it = pipeline.make_train_iterator(cfg, TOK, seq_len=seq, batch_size=1, seed=7,
                                    process_index=process_index, process_count=process_count)
  out = []
  for b in _take(it, len(docs)):
    real = b['inputs'][0][b['segment_ids'][0] > 0]
    assert real[-1] == TOK.eos_id  # the whole document fit
    out.append(TOK.decode(real))
  return out


def test_process_shards_partition_the_epoch(corpus):
  cfg = _cfg(corpus, packing=False)
  single = _epoch_docs(cfg, 0, 1)
  parts = [_epoch_docs(cfg, i, 2) for i in range(2)]
  assert len(set(single)) == len(single) == len(parts[0]) + len(parts[1])
  assert sorted(parts[0] + parts[1]) == sorted(single)
  assert not set(parts[0]) & set(parts[1])


def test_eval_batches(corpus):
  cfg = corpus[0]
  first = pipeline.make_eval_batches(cfg, TOK, seq_len=SEQ, batch_size=BATCH, num_batches=2)
  assert _same(first, pipeline.make_eval_batches(cfg, TOK, seq_len=SEQ, batch_size=BATCH, num_batches=2))
  assert len(first) == 2
  for b in first:
    _check_invariants(b)
  many = pipeline.make_eval_batches(cfg, TOK, seq_len=SEQ, batch_size=BATCH, num_batches=1000)
  assert 2 < len(many) < 1000  # the split ran out: fewer batches
  assert _same(many[:2], first)
  val_tokens = sum(len(TOK.encode(d)) + 2 for d in pipeline._shard_documents(cfg, 'validation', 0, 1))  # pylint: disable=protected-access
  # Packing keeps every token (byte ids are never 0 = pad): the batches hold the whole split.
  assert sum(int((b['inputs'] != 0).sum() + (b['targets'][:, -1] != 0).sum()) for b in many) == val_tokens
  shards = [pipeline.make_eval_batches(cfg, TOK, seq_len=SEQ, batch_size=BATCH, num_batches=1000,
                                       process_index=i, process_count=2) for i in range(2)]
  assert len(shards[0]) == len(shards[1])  # lockstep across processes


def test_empty_and_bad_streams(corpus, monkeypatch, tmp_path):
  cfg = corpus[0]
  with pytest.raises(DataError, match='process_index'):
    _train(cfg, process_index=2, process_count=2)
  with pytest.raises(DataError, match='fewer than process_count'):
    _train(cfg, process_index=999, process_count=1000)
  empty = _cfg(corpus, validation_fraction=0.0, cache_dir=str(tmp_path / 'c'))
  with pytest.raises(DataError, match="split 'validation' .* is empty"):
    pipeline.make_eval_batches(empty, TOK, seq_len=SEQ, batch_size=BATCH, num_batches=1)
  monkeypatch.setattr(pipeline, 'open_split', lambda cfg, split: builders.TextSource(['', '', '']))
  it = _train(cfg)
  with pytest.raises(DataError, match='only empty documents'):
    next(it)
  with pytest.raises(DataError, match='no text'):
    pipeline.make_eval_batches(cfg, TOK, seq_len=SEQ, batch_size=BATCH, num_batches=1)


def test_global_batches_do_not_depend_on_the_process_count(corpus):
  """With a fixed num_streams, 2 processes' local batches, stacked, equal the 1-process batch."""
  cfg = _cfg(corpus)
  cfg.num_streams = 2
  tok = load_tokenizer('byte')
  make = lambda p, n, b: pipeline.make_train_iterator(cfg, tok, seq_len=16, batch_size=b, seed=3,
                                                     process_index=p, process_count=n)
  single, first, second = make(0, 1, 4), make(0, 2, 2), make(1, 2, 2)
  for _ in range(5):
    whole, a, b = next(single), next(first), next(second)
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))
  # the state saved by two processes restores a one-process iterator exactly
  merged = {'num_streams': 2, 'streams': {**json.loads(first.get_state())['streams'],
                                          **json.loads(second.get_state())['streams']}}
  resumed = make(0, 1, 4)
  resumed.set_state(merged)
  np.testing.assert_array_equal(next(resumed)['inputs'], next(single)['inputs'])
