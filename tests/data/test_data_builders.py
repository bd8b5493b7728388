"""Local corpora as cached TFDS datasets: documents, splits, caching, tfds source, bad inputs."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import pytest
import tensorflow_datasets as tfds

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
  # A second open reuses the cache (no rebuild), a changed file rebuilds elsewhere.
  reader = builders.local_reader(cfg)
  first = builders.dataset_dir(cfg, reader)
  assert builders.build_local(cfg) == first and os.listdir(cfg.cache_dir) == [os.path.basename(first)]
  (tmp_path / 'txt' / '000.txt').write_text('changed text')
  assert builders.dataset_dir(cfg, builders.local_reader(cfg)) != first
  assert 'changed text' in _all(builders.open_split(cfg, 'train')) + _all(builders.open_split(cfg, 'validation'))


KNOWN_HALF_SPLIT = [False, True, True, True, True, False, False, True]  # 'doc {i} ✓ ' at fraction 0.5


def _reference_is_validation(text, fraction):
  """Independent statement of the documented rule: the SHA-1 of the UTF-8 text, as a fraction of 2**64."""
  return int(hashlib.sha1(text.encode('utf-8')).hexdigest()[:16], 16) / 2.0**64 < fraction


def test_validation_split_follows_the_documented_hash_and_fraction():
  docs = [f'doc {i} ✓ ' + 'x' * (i % 13) for i in range(5000)]
  for fraction in (0.02, 0.1, 0.5):
    held = [builders.is_validation(d, fraction) for d in docs]
    assert held == [_reference_is_validation(d, fraction) for d in docs]
    share = sum(held) / len(docs)   # binomial std <= 0.0071 at 0.5: 4 sigma margins
    assert abs(share - fraction) < 4 * (fraction * (1 - fraction) / len(docs)) ** 0.5 + 1e-3, (fraction, share)
  assert not any(builders.is_validation(d, 0.0) for d in docs)
  # Known assignments (computed once with hashlib): a change of the rule moves documents between splits.
  assert [builders.is_validation(f'doc {i} ✓ ', 0.5) for i in range(8)] == [
      _reference_is_validation(f'doc {i} ✓ ', 0.5) for i in range(8)] == KNOWN_HALF_SPLIT


def test_validation_split_is_the_same_in_another_process():
  """Not Python's salted hash(): a fresh interpreter with another PYTHONHASHSEED agrees."""
  docs = [f'process doc {i}' for i in range(200)]
  code = ('import json, sys; from fmjax.data import builders; '
          'print(json.dumps([builders.is_validation(d, 0.3) for d in json.load(sys.stdin)]))')
  env = dict(os.environ, PYTHONHASHSEED='12345')
  out = subprocess.run([sys.executable, '-c', code], input=json.dumps(docs), capture_output=True, text=True,
                       env=env, check=True).stdout
  assert json.loads(out) == [builders.is_validation(d, 0.3) for d in docs]
  assert 20 < sum(json.loads(out)) < 100


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


class FmjaxTestText(tfds.core.GeneratorBasedBuilder):
  """A tiny TFDS dataset with a `text` feature, prepared as ArrayRecord by the tests."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None
  DOCS: list = []

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, doc in enumerate(self.DOCS):
      yield i, {'text': doc}


def _prepare_tfds(data_dir, docs):
  FmjaxTestText.DOCS = docs
  tfds.display_progress_bar(False)
  FmjaxTestText(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return os.path.join(str(data_dir), 'fmjax_test_text', '1.0.0')


def test_tfds_source_reads_array_record_by_name(tmp_path):
  docs = [f'tfds doc {i} ☃' for i in range(10)]
  version_dir = _prepare_tfds(tmp_path / 'tfds', docs)
  tcfg = _cfg(tmp_path, source='tfds', tfds_name='fmjax_test_text', tfds_data_dir=str(tmp_path / 'tfds'))
  assert sorted(_all(builders.open_split(tcfg, 'train'))) == sorted(docs)
  with pytest.raises(DataError, match="no split 'test'"):
    builders.open_split(tcfg, 'test')
  tcfg.text_feature = 'content'
  with pytest.raises(DataError, match="no feature 'content'.*data.text_feature"):
    builders.open_split(tcfg, 'train')
  tcfg.text_feature = 'text'
  # A prepared dataset whose builder is not importable here (c4 without TensorFlow) is read from its folder.
  shutil.copytree(version_dir, tmp_path / 'other' / 'web_like' / 'en' / '3.1.0')
  ocfg = _cfg(tmp_path, source='tfds', tfds_name='web_like/en:3.1.0', tfds_data_dir=str(tmp_path / 'other'))
  assert sorted(_all(builders.open_split(ocfg, 'train'))) == sorted(docs)
  # A TFRecord dataset is not read into memory: one line with the exact conversion command.
  info_path = os.path.join(version_dir, 'dataset_info.json')
  info = json.load(open(info_path))
  info['fileFormat'] = 'tfrecord'
  json.dump(info, open(info_path, 'w'))
  with pytest.raises(DataError) as e:
    builders.open_split(tcfg, 'train')
  msg = str(e.value)
  assert '\n' not in msg and 'stored as tfrecord' in msg
  assert f'tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record' in msg


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


def _mixed_dir(root):
  """Two text files, a PNG-like file (NUL bytes), a Latin-1 file and a shared-object-like file."""
  root.mkdir()
  (root / 'good.txt').write_text('fine text\n')
  (root / 'also good.md').write_text('more text ☃\n')
  (root / 'image.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' + bytes(range(256)))
  (root / 'latin1.txt').write_bytes(b'caf\xe9 latin-1')
  (root / 'libx.so').write_bytes(b'\x7fELF\x02\x01\x01' + b'\x00' * 40)
  return str(root / '*')


def test_binary_files_are_refused_in_one_line_naming_them(tmp_path):
  cfg = _cfg(tmp_path, source='text', files=_mixed_dir(tmp_path / 'mixed'), validation_fraction=0.0)
  with pytest.raises(DataError) as e:
    builders.open_split(cfg, 'train')
  msg = str(e.value)
  assert '\n' not in msg and msg.startswith('3 of 5 files matched by data.files=')
  assert 'image.png' in msg and 'latin1.txt' in msg and 'libx.so' in msg and 'good.txt' not in msg
  assert 'data.skip_binary=true' in msg
  assert not os.path.exists(cfg.cache_dir)   # a refused build is never cached
  with pytest.raises(DataError, match='3 of 5 files'):  # and a second try refuses again
    builders.open_split(cfg, 'validation')
  # Many binary files: the first three are named, the rest counted.
  for i in range(4):
    (tmp_path / 'mixed' / f'z{i}.bin').write_bytes(b'\x00\x01')
  with pytest.raises(DataError, match=r'7 of 9 files .*: .*image\.png, .*latin1\.txt, .*libx\.so and 4 more;'):
    builders.open_split(cfg, 'train')


def test_jsonl_binary_file_is_refused_not_parsed(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"text": "ok"}\n')
  (tmp_path / 'b.jsonl').write_bytes(b'{"text": "\xff\xfe"}\n')
  cfg = _cfg(tmp_path, source='jsonl', files=str(tmp_path / '*.jsonl'), validation_fraction=0.0)
  with pytest.raises(DataError, match=r'1 of 2 files .*b\.jsonl'):
    builders.open_split(cfg, 'train')


def test_skip_binary_leaves_them_out_with_a_warning_also_when_cached(tmp_path, caplog):
  pattern = _mixed_dir(tmp_path / 'mixed')
  cfg = _cfg(tmp_path, source='text', files=pattern, validation_fraction=0.0, skip_binary=True)
  with caplog.at_level(logging.WARNING):
    train = _all(builders.open_split(cfg, 'train'))
  assert sorted(train) == ['fine text\n', 'more text ☃\n']
  warnings = [r.getMessage() for r in caplog.records if 'skip_binary' in r.getMessage()]
  assert len(warnings) == 1 and 'left out 3 binary' in warnings[0] and 'image.png' in warnings[0]
  built = builders.build_local(cfg)
  # A cached build made with skip_binary=true is not reused without it: the refusal still happens.
  cfg.skip_binary = False
  with pytest.raises(DataError, match='3 of 5 files'):
    builders.open_split(cfg, 'train')
  assert os.listdir(cfg.cache_dir) == [os.path.basename(built)]
  # Reusing the cached skip build in a new process repeats the warning.
  builders._warned.clear()  # pylint: disable=protected-access
  cfg.skip_binary = True
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert builders.build_local(cfg) == built
  assert 'left out 3 binary' in caplog.text


def test_stdlib_reader_replaces_bad_bytes(tmp_path, caplog):
  """The stdlib corpus keeps its few Latin-1 files, decoded with U+FFFD (a documented exception)."""
  (tmp_path / 'bad.py').write_bytes(b'caf\xe9 = 1')
  reader = builders.DocumentReader([str(tmp_path / 'bad.py')], binary_files='replace')
  docs, binary = reader.file_documents(0)
  assert binary and docs == [('00000000-00000000', 'caf\ufffd = 1')]
  assert builders.local_reader(_cfg(tmp_path)).binary_files == 'replace'
