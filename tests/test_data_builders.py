"""Local corpora as cached TFDS datasets: documents, splits, caching, tfds source, bad inputs."""

import json
import logging
import os
import threading

import pytest

from fmjax.config import data_defaults
from fmjax.data import builders, corpora
from fmjax.data.errors import DataError


def _cfg(tmp_path, **kw):
  cfg = data_defaults()
  cfg.cache_dir = str(tmp_path / 'cache')
  cfg.update(kw)
  return cfg


def _write_docs(root, n=40):
  root.mkdir(parents=True, exist_ok=True)
  docs = [f'document {i}: ' + 'word ' * (i * 7 % 50) + ('ünïcødé 日本 😀' if i % 5 == 0 else '')
          for i in range(n)]
  for i, doc in enumerate(docs):
    (root / f'{i:03d}.txt').write_text(doc, encoding='utf-8')
  return docs


def _all(source):
  return [source[i] for i in range(len(source))]


def test_stdlib_files():
  files = corpora.stdlib_files()
  assert len(files) > 1000 and files == sorted(files)
  assert all(f.endswith('.py') and 'site-packages' not in f for f in files)
  assert os.path.join(corpora.stdlib_dir(), 'os.py') in files


def test_text_splits_stable_disjoint_and_complete(tmp_path):
  docs = _write_docs(tmp_path / 'txt')
  cfg = _cfg(tmp_path, source='text', files=str(tmp_path / 'txt' / '*.txt'), validation_fraction=0.25)
  train, val = _all(builders.open_split(cfg, 'train')), _all(builders.open_split(cfg, 'validation'))
  assert sorted(train + val) == sorted(docs)
  assert not set(train) & set(val) and val
  assert all(isinstance(d, str) for d in train)
  assert sorted(val) == sorted(d for d in docs if builders.is_validation(d, 0.25))
  # The hash is stable: a known document's assignment never changes.
  assert builders.is_validation('document 0: ', 0.25) == builders.is_validation('document 0: ', 0.25)
  # A second open reuses the cache (no rebuild), a changed file rebuilds elsewhere.
  reader = builders.local_reader(cfg)
  first = builders.dataset_dir(cfg, reader)
  assert builders.build_local(cfg) == first and os.listdir(cfg.cache_dir) == [os.path.basename(first)]
  (tmp_path / 'txt' / '000.txt').write_text('changed text')
  assert builders.dataset_dir(cfg, builders.local_reader(cfg)) != first
  assert 'changed text' in _all(builders.open_split(cfg, 'train')) + _all(builders.open_split(cfg, 'validation'))


def test_paragraphs_and_jsonl(tmp_path):
  (tmp_path / 'a.txt').write_text('first para\nline two\n\n  \n\nsecond para\n\n\n')
  cfg = _cfg(tmp_path, source='text', files=str(tmp_path / 'a.txt'), split_by='paragraph',
             validation_fraction=0.0)
  assert sorted(_all(builders.open_split(cfg, 'train'))) == ['first para\nline two', 'second para']
  lines = [json.dumps({'body': f'jsonl doc {i} ☃', 'id': i}) for i in range(5)]
  (tmp_path / 'a.jsonl').write_text('\n'.join(lines) + '\n\n')
  cfg = _cfg(tmp_path, source='jsonl', files=str(tmp_path / '*.jsonl'), jsonl_field='body',
             validation_fraction=0.0)
  assert sorted(_all(builders.open_split(cfg, 'train'))) == [f'jsonl doc {i} ☃' for i in range(5)]
  cfg.jsonl_field = 'text'
  with pytest.raises(DataError, match=r"a.jsonl:1: no field 'text'.*data.jsonl_field"):
    builders.open_split(cfg, 'train')


def test_concurrent_builds_agree(tmp_path):
  docs = _write_docs(tmp_path / 'txt', 10)
  cfg = _cfg(tmp_path, source='text', files=str(tmp_path / 'txt' / '*.txt'), validation_fraction=0.0)
  results, errors = [], []

  def build():
    try:
      results.append(builders.build_local(cfg))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(set(results)) == 1
  assert os.listdir(cfg.cache_dir) == [os.path.basename(results[0])]  # no temp dirs left
  assert sorted(_all(builders.open_split(cfg, 'train'))) == sorted(docs)


def test_tfds_source_reads_array_record_by_name(tmp_path):
  docs = _write_docs(tmp_path / 'txt', 10)
  cfg = _cfg(tmp_path, source='text', files=str(tmp_path / 'txt' / '*.txt'), validation_fraction=0.0)
  data_dir = builders.build_local(cfg)
  tcfg = _cfg(tmp_path, source='tfds', tfds_name='fmjax_text', tfds_data_dir=data_dir)
  assert sorted(_all(builders.open_split(tcfg, 'train'))) == sorted(docs)
  with pytest.raises(DataError, match="no split 'test'"):
    builders.open_split(tcfg, 'test')
  tcfg.text_feature = 'content'
  with pytest.raises(DataError, match="no feature 'content'.*data.text_feature"):
    builders.open_split(tcfg, 'train')
  # A TFRecord-only dataset needs TensorFlow, which is not installed here.
  info_path = os.path.join(data_dir, 'fmjax_text', '1.0.0', 'dataset_info.json')
  info = json.load(open(info_path))
  info['fileFormat'] = 'tfrecord'
  json.dump(info, open(info_path, 'w'))
  tcfg.text_feature = 'text'
  if builders._tensorflow_available():  # pylint: disable=protected-access
    pytest.skip('TensorFlow is installed')
  with pytest.raises(DataError, match=r"pip install 'fmjax\[tensorflow\]'"):
    builders.open_split(tcfg, 'train')


def test_unknown_tfds_dataset(tmp_path):
  cfg = _cfg(tmp_path, source='tfds', tfds_name='no_such_dataset_xyz', tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError, match="'no_such_dataset_xyz' not found"):
    builders.open_split(cfg, 'train')
  cfg.tfds_name = ''
  with pytest.raises(DataError, match='needs data.tfds_name'):
    builders.open_split(cfg, 'train')


def test_bad_inputs(tmp_path):
  cfg = _cfg(tmp_path, source='text', files=str(tmp_path / 'missing' / '*.txt'))
  with pytest.raises(DataError, match='matches no files'):
    builders.open_split(cfg, 'train')
  (tmp_path / 'dir.txt').mkdir()
  cfg.files = str(tmp_path / 'dir.txt')
  with pytest.raises(DataError, match='not a regular file'):
    builders.open_split(cfg, 'train')
  os.symlink(tmp_path / 'gone.txt', tmp_path / 'link.txt')
  cfg.files = str(tmp_path / 'link.txt')
  with pytest.raises(DataError, match='cannot read input file .*link.txt'):
    builders.open_split(cfg, 'train')
  (tmp_path / 'e').mkdir()
  (tmp_path / 'e' / 'a.txt').write_text('')
  (tmp_path / 'e' / 'b.txt').write_text(' \n\n \t\n')
  cfg.files = str(tmp_path / 'e' / '*.txt')
  with pytest.raises(DataError, match='no non-empty documents'):
    builders.open_split(cfg, 'train')
  assert not os.path.exists(cfg.cache_dir)  # rejected before anything was written
  with pytest.raises(DataError, match="split 'test' does not exist"):
    builders.open_split(_cfg(tmp_path, source='text', files=str(tmp_path / 'e' / '*.txt')), 'test')


def test_non_utf8_counted_in_log(tmp_path, caplog):
  root = tmp_path / 'bin'
  root.mkdir()
  (root / 'good.txt').write_text('fine text')
  (root / 'bad1.txt').write_bytes(b'caf\xe9 latin-1')
  (root / 'bad2.txt').write_bytes(b'\xff\xfe broken')
  cfg = _cfg(tmp_path, source='text', files=str(root / '*.txt'), validation_fraction=0.0)
  with caplog.at_level(logging.WARNING):
    train = _all(builders.open_split(cfg, 'train'))
  assert '2 of 3 input files are not valid UTF-8' in caplog.text
  assert 'caf\ufffd latin-1' in train
