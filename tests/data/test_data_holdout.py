"""A validation split that always exists: small corpora whose hash split holds out nothing, single
documents, copies; cached builds; errors of an empty eval split naming the source in use."""

import hashlib
import json
import logging
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from fmjax import config
from fmjax.data import builders, holdout, pipeline
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import load_tokenizer

TOK = load_tokenizer('byte')
WORDS = 'alpha beta gamma delta epsilon zeta eta theta iota kappa'.split()


def _sha1(text):   # the reference: SHA-1 of the UTF-8 text, as a 64-bit fraction of 2**64
  return int.from_bytes(hashlib.sha1(text.encode('utf-8')).digest()[:8], 'big')


def _texts_none_held(n, fraction, seed=0):
  """n distinct texts of which a hash split at `fraction` holds out none (today's empty validation)."""
  rng, texts = random.Random(seed), []
  while len(texts) < n:
    text = ' '.join(rng.choice(WORDS) for _ in range(30)) + '\n'
    if _sha1(text) >= fraction * 2.0**64 and text not in texts:
      texts.append(text)
  return texts


def _write_files(root, texts):
  root.mkdir(parents=True, exist_ok=True)
  for i, text in enumerate(texts):
    (root / f'f{i:02d}.txt').write_text(text)
  return str(root / '*.txt')


def _data_cfg(tmp_path, **kw):
  cfg = config.data_defaults()
  cfg.cache_dir = str(tmp_path / 'cache')
  cfg.update(kw)
  return cfg


def _all(source):
  return [source[i] for i in range(len(source))]


def _reset_notices():
  builders._noticed.clear()  # pylint: disable=protected-access


def test_sixty_small_files_train_with_the_defaults_and_evaluate_on_a_held_out_file(tmp_path, caplog):
  from fmjax import train as train_lib
  texts = _texts_none_held(60, 0.02)
  pattern = _write_files(tmp_path / 'txt', texts)
  cfg = config.base_config()
  assert cfg.data.source == 'stdlib' and cfg.data.validation_fraction == 0.02   # the defaults, files named only
  cfg.model.update(dict(vocab_size=264, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64,
                        max_seq_len=32))
  cfg.data.update(dict(files=pattern, cache_dir=str(tmp_path / 'cache')))
  cfg.update(dict(seq_len=32, global_batch_size=8, steps=2, eval_every=2, eval_batches=4, log_every=1,
                  progress_bar=False, async_checkpoints=False, workdir=str(tmp_path / 'work')))
  cfg.optim.warmup_steps = 1
  _reset_notices()
  with caplog.at_level(logging.INFO, logger='fmjax'):
    train_lib.train(cfg)
  expected = min(range(60), key=lambda i: hashlib.sha1(texts[i].encode()).digest())   # the smallest hash
  notices = [r.getMessage() for r in caplog.records if 'holding out' in r.getMessage()]
  assert len(notices) == 1 and f'f{expected:02d}.txt' in notices[0] and 'none of the 60 documents' in notices[0]
  assert "data.source='text'" in notices[0]                   # the source in use, not the config's 'stdlib'
  with open(tmp_path / 'work' / 'metrics.jsonl') as f:
    evals = [r for r in map(json.loads, f) if r.get('split') == 'eval']
  assert evals and evals[-1]['step'] == 2
  size = len(texts[expected].encode())   # bos + bytes + eos packed in rows of 33: each row's first token is no target
  assert evals[-1]['bytes'] == size - (-(-(size + 2) // 33) - 1)   # the eval rows are that one file
  resolved = builders.with_source(cfg.data)
  train = _all(builders.open_split(resolved, 'train'))
  assert texts[expected] not in train and sorted(train) == sorted(t for i, t in enumerate(texts) if i != expected)
  assert _all(builders.open_split(resolved, 'validation')) == [texts[expected]]


def test_the_hold_out_is_kept_with_a_cached_build_and_rebuilt_without_changing(tmp_path, caplog):
  texts = _texts_none_held(12, 0.05, seed=1)
  cfg = _data_cfg(tmp_path, source='text', files=_write_files(tmp_path / 'txt', texts), validation_fraction=0.05)
  first = _all(builders.open_split(cfg, 'validation'))
  directory = builders.build_local(cfg)
  assert os.path.exists(os.path.join(directory, holdout.HOLDOUT)) and len(first) == 1
  _reset_notices()
  with caplog.at_level(logging.INFO, logger='fmjax'):
    again = _all(builders.open_split(cfg, 'validation'))
  assert again == first and any('holding out' in r.getMessage() for r in caplog.records)  # told on reuse too
  os.remove(os.path.join(directory, holdout.HOLDOUT))          # a build cached before hold-outs existed
  assert _all(builders.open_split(cfg, 'validation')) == first
  train = _all(builders.open_split(cfg, 'train'))
  assert sorted(train + first) == sorted(texts) and not set(train) & set(first)


def test_a_non_empty_hash_split_is_untouched(tmp_path):
  texts = [f'document {i} ' + 'word ' * i for i in range(40)]
  cfg = _data_cfg(tmp_path, source='text', files=_write_files(tmp_path / 'txt', texts), validation_fraction=0.25)
  val = _all(builders.open_split(cfg, 'validation'))
  assert val and sorted(val) == sorted(t for t in texts if _sha1(t) < 0.25 * 2.0**64)
  assert not os.path.exists(os.path.join(builders.build_local(cfg), holdout.HOLDOUT))


def test_copies_of_the_held_out_text_are_held_out_together(tmp_path):
  texts = _texts_none_held(4, 0.1, seed=2)
  smallest = min(texts, key=lambda t: hashlib.sha1(t.encode()).digest())
  lines = texts + [smallest, smallest]
  (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in lines))
  cfg = _data_cfg(tmp_path, source='jsonl', files=str(tmp_path / 'docs.jsonl'), validation_fraction=0.1)
  assert _all(builders.open_split(cfg, 'validation')) == [smallest] * 3
  assert sorted(_all(builders.open_split(cfg, 'train'))) == sorted(t for t in texts if t != smallest)


def test_all_copies_of_one_text_hold_out_nothing_and_the_error_says_why(tmp_path):
  (tmp_path / 'docs.jsonl').write_text(json.dumps({'text': 'same words'}) + '\n' + json.dumps({'text': 'same words'}))
  cfg = _data_cfg(tmp_path, source='jsonl', files=str(tmp_path / 'docs.jsonl'), validation_fraction=0.02)
  assert len(builders.open_split(cfg, 'train')) == 2
  with pytest.raises(DataError) as e:
    pipeline.check_eval_split(cfg)
  msg = str(e.value)
  assert '\n' not in msg and "data.source='jsonl'" in msg and 'all 2 documents are the same text' in msg


def test_a_single_document_holds_out_its_tail_at_a_line_break(tmp_path):
  lines = [f'line {i}: ' + ' '.join(WORDS[(i + k) % 10] for k in range(8)) for i in range(100)]
  text = '\n'.join(lines) + '\n'
  (tmp_path / 'input.txt').write_text(text)   # no blank line: one paragraph, one document
  cfg = _data_cfg(tmp_path, source='text', files=str(tmp_path / 'input.txt'), validation_fraction=0.05)
  train, val = _all(builders.open_split(cfg, 'train')), _all(builders.open_split(cfg, 'validation'))
  assert len(train) == len(val) == 1 and train[0] + val[0] == text.rstrip('\n')
  assert train[0].endswith('\n') and val[0].startswith('line ')        # cut at a line break
  assert abs(len(val[0]) - 0.05 * len(text)) <= max(len(x) for x in lines) + 1
  batches = pipeline.make_eval_batches(cfg, TOK, seq_len=32, batch_size=4, num_batches=1)
  assert TOK.decode(batches[0]['inputs'][0][1:20]) == val[0][:19]


def test_cut_offset():
  assert holdout.cut_offset('abcdefghij', 0.2) == 8                   # no break: exactly the last 20%
  assert holdout.cut_offset('one two three four five six', 0.1) == 24   # the space nearest to the point
  assert holdout.cut_offset('ab', 0.1) == 1
  assert holdout.cut_offset('a', 0.5) is None and holdout.cut_offset('a   ', 0.5) is None


def test_split_view_matches_a_reference():
  rng = np.random.default_rng(0)
  docs = [f'doc {i}' for i in range(50)]
  for _ in range(20):
    held = sorted(rng.choice(50, size=int(rng.integers(1, 6)), replace=False).tolist())
    plan = holdout.Plan(held=held)
    train, val = holdout.SplitView(docs, plan, 'train'), holdout.SplitView(docs, plan, 'validation')
    assert _all(train) == [d for i, d in enumerate(docs) if i not in held]
    assert train.__getitems__([0, len(train) - 1]) == [_all(train)[0], _all(train)[-1]]
    assert _all(val) == [docs[i] for i in held] and train[-1] == _all(train)[-1]


def _one_line(cfg):
  with pytest.raises(DataError) as e:
    pipeline.check_eval_split(cfg)
  msg = str(e.value)
  assert '\n' not in msg
  return msg


def test_an_empty_eval_split_names_the_source_in_use(tmp_path):
  (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': f'doc {i}'}) + '\n' for i in range(3)))
  pq.write_table(pa.table({'text': [f'row {i}' for i in range(3)]}), tmp_path / 'docs.parquet')
  (tmp_path / 'a.txt').write_text('text a')
  kw = dict(validation_fraction=0.0)
  msg = _one_line(_data_cfg(tmp_path, files=str(tmp_path / 'a.txt'), **kw))   # source left at 'stdlib'
  assert f"data.files='{tmp_path / 'a.txt'}' (read as data.source=text)" in msg and "'stdlib'" not in msg
  assert 'data.validation_fraction=0 holds out nothing' in msg
  assert "data.source='jsonl'" in _one_line(_data_cfg(tmp_path, source='jsonl', files=str(tmp_path / '*.jsonl'),
                                                      **kw))
  assert '(read as data.source=parquet)' in _one_line(_data_cfg(tmp_path, files=str(tmp_path / '*.parquet'), **kw))
  assert "data.source='parquet'" in _one_line(_data_cfg(tmp_path, source='parquet', files=str(tmp_path / '*.parquet'),
                                                        **kw))
  msg = _one_line(_data_cfg(tmp_path, mixture=f'web:0.5:{tmp_path}/*.jsonl,tab:0.5:{tmp_path}/*.parquet', **kw))
  assert "every data.mixture source is empty ('web' (data.source='jsonl'" in msg
  assert "'tab' (data.source='parquet'" in msg
  (tmp_path / 'blank.txt').write_text('   \n')
  msg = _one_line(_data_cfg(tmp_path, files=str(tmp_path / 'a.txt'), eval_files=str(tmp_path / 'blank.txt')))
  assert 'data.eval_files=' in msg and 'holds no text' in msg


class FmjaxHoldoutText(tfds.core.GeneratorBasedBuilder):
  """A prepared TFDS dataset with a 'train' split only (TFDS cannot prepare an empty split)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {'text': f'tfds doc {i}'}


def test_a_missing_tfds_eval_split_names_the_dataset_also_in_a_mixture(tmp_path):
  tfds.display_progress_bar(False)
  FmjaxHoldoutText(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
  cfg = _data_cfg(tmp_path, source='tfds', tfds_name='fmjax_holdout_text', tfds_data_dir=str(tmp_path / 'tfds'))
  assert len(builders.open_split(cfg, 'train')) == 3
  expected = "TFDS dataset 'fmjax_holdout_text' has no split 'validation'; it has train"
  assert expected in _one_line(cfg)
  (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': f'doc {i}'}) + '\n' for i in range(3)))
  mixed = _data_cfg(tmp_path, tfds_data_dir=str(tmp_path / 'tfds'), validation_fraction=0.0,
                    mixture=f'web:0.5:{tmp_path}/*.jsonl,set:0.5:tfds:fmjax_holdout_text')
  assert expected in _one_line(mixed)


def test_a_single_held_out_document_is_evaluated_by_two_processes_in_lockstep(tmp_path):
  texts = _texts_none_held(8, 0.02, seed=3)
  cfg = _data_cfg(tmp_path, source='text', files=_write_files(tmp_path / 'txt', texts))
  assert len(builders.open_split(cfg, 'validation')) == 1
  one = pipeline.make_eval_batches(cfg, TOK, seq_len=16, batch_size=2, num_batches=8)
  two = [pipeline.make_eval_batches(cfg, TOK, seq_len=16, batch_size=1, num_batches=16, process_index=i,
                                    process_count=2) for i in range(2)]
  assert len(two[0]) == len(two[1]) > 0
  weight = lambda batches: sum(float(b['weights'].sum()) for b in batches)  # noqa: E731
  assert weight(two[0]) == weight(one) > 0 and weight(two[1]) == 0        # process 1 has no document: padding
