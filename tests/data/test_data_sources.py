"""Input formats and local builds: text/JSONL/Parquet, plain or compressed, one token stream;
bad inputs as one line; single-file and eval-file splits; bounded build memory; cache keys."""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from fmjax.config import data_defaults
from fmjax.data import builders, local_build, pipeline
from fmjax.data.batches import BATCH_KEYS
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import load_tokenizer

TOK = load_tokenizer('byte')
DOCS = [f'doc {i}: ' + 'ünïcødé 日本 😀 ' * (i % 4) + 'line\nnext "quoted" \\ tab\t' * (i % 3)
        + 'x' * (i * 37 % 300) for i in range(40)]


def _cfg(tmp_path, **kw):
  cfg = data_defaults()
  cfg.cache_dir = str(tmp_path / 'cache')
  cfg.validation_fraction = 0.0
  cfg.update(kw)
  return cfg


def _jsonl_bytes(docs):
  return ''.join(json.dumps({'id': i, 'text': d}, ensure_ascii=i % 2 == 0) + '\n' for i, d in enumerate(docs)).encode()


def _write_formats(root, docs):
  """The same documents as .txt files, .jsonl, .jsonl.gz, .jsonl.zst and .parquet."""
  (root / 'txt').mkdir(parents=True)
  for i, d in enumerate(docs):
    (root / 'txt' / f'{i:03d}.txt').write_text(d, encoding='utf-8')
  (root / 'docs.jsonl').write_bytes(_jsonl_bytes(docs))
  with gzip.open(root / 'docs.jsonl.gz', 'wb') as f:
    f.write(_jsonl_bytes(docs))
  (root / 'docs.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(docs)))
  pq.write_table(pa.table({'id': list(range(len(docs))), 'text': docs}), root / 'docs.parquet', row_group_size=7)
  return {'text': ('txt/*.txt', 'text'), 'jsonl': ('docs.jsonl', 'jsonl'), 'gz': ('docs.jsonl.gz', 'jsonl'),
          'zst': ('docs.jsonl.zst', 'jsonl'), 'parquet': ('docs.parquet', 'parquet')}


def _batches(cfg, n=12):
  it = pipeline.make_train_iterator(cfg, TOK, seq_len=32, batch_size=4, seed=3)
  return [next(it) for _ in range(n)]


def test_every_format_gives_the_same_documents_and_token_stream(tmp_path):
  variants = _write_formats(tmp_path, DOCS)
  streams = {}
  for name, (pattern, source) in variants.items():
    cfg = _cfg(tmp_path, source=source, files=str(tmp_path / pattern))
    train = builders.open_split(cfg, 'train')
    assert [train[i] for i in range(len(train))] == DOCS, name   # file / line / row order is kept
    streams[name] = _batches(cfg)
  reference = streams.pop('text')
  for name, batches in streams.items():
    for a, b in zip(reference, batches):
      for k in BATCH_KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=name)
  # The stream holds the documents' bytes (an independent check of the first row).
  first = reference[0]['inputs'][0]
  assert TOK.decode(first[first >= 3]) in ''.join(DOCS)


def test_compressed_text_is_decompressed(tmp_path):
  with gzip.open(tmp_path / 'a.txt.gz', 'wt', encoding='utf-8') as f:
    f.write('para one\n\npara two ☃\n')
  (tmp_path / 'b.txt.zst').write_bytes(zstandard.ZstdCompressor().compress('para three\n'.encode()))
  cfg = _cfg(tmp_path, source='text', files=str(tmp_path / '*.txt.*'), split_by='paragraph')
  train = builders.open_split(cfg, 'train')
  assert [train[i] for i in range(len(train))] == ['para one', 'para two ☃', 'para three']


def _one_line_error(cfg, match):
  with pytest.raises(DataError, match=match) as e:
    builders.open_split(cfg, 'train')
  assert '\n' not in str(e.value)
  return str(e.value)


def test_compressed_or_structured_files_as_text_are_one_line_errors(tmp_path):
  _write_formats(tmp_path, DOCS[:3])
  msg = _one_line_error(_cfg(tmp_path, source='text', files=str(tmp_path / 'docs.jsonl.gz')),
                        r'docs\.jsonl\.gz is a gzip-compressed jsonl file, not text: set data\.source=jsonl')
  assert 'raw bytes' in msg
  _one_line_error(_cfg(tmp_path, source='text', files=str(tmp_path / 'docs.parquet')), 'set data.source=parquet')
  _one_line_error(_cfg(tmp_path, source='jsonl', files=str(tmp_path / 'docs.parquet')), 'set data.source=parquet')
  assert not os.path.exists(tmp_path / 'cache')


def test_broken_and_binary_compressed_files(tmp_path):
  (tmp_path / 'bad.jsonl.gz').write_bytes(b'not gzip at all')
  _one_line_error(_cfg(tmp_path, source='jsonl', files=str(tmp_path / 'bad.jsonl.gz')),
                  r'cannot read .*bad\.jsonl\.gz: not a valid gzip stream')
  (tmp_path / 'bad.jsonl.zst').write_bytes(b'\x28\xb5\x2f\xfdgarbage')
  _one_line_error(_cfg(tmp_path, source='jsonl', files=str(tmp_path / 'bad.jsonl.zst')),
                  r'cannot read .*bad\.jsonl\.zst: not a valid zstd stream')
  with gzip.open(tmp_path / 'nul.txt.gz', 'wb') as f:
    f.write(b'text\x00with a NUL')
  _one_line_error(_cfg(tmp_path, source='text', files=str(tmp_path / 'nul.txt.gz')), r'1 of 1 files .*nul\.txt\.gz')
  pq.write_table(pa.table({'body': ['a']}), tmp_path / 'other.parquet')
  _one_line_error(_cfg(tmp_path, source='parquet', files=str(tmp_path / 'other.parquet')),
                  r"no column 'text'; set data\.jsonl_field .* body")
  assert not os.path.exists(tmp_path / 'cache')


def test_skip_binary_within_a_build_group_keeps_the_good_files(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"text": "good one"}\n')
  (tmp_path / 'b.jsonl').write_bytes(b'{"text": "half"}\n{"text": "\xff"}\n')
  (tmp_path / 'c.jsonl').write_text('{"text": "good two"}\n')
  cfg = _cfg(tmp_path, source='jsonl', files=str(tmp_path / '*.jsonl'), skip_binary=True)
  train = builders.open_split(cfg, 'train')
  assert [train[i] for i in range(len(train))] == ['good one', 'good two']   # none of b, not even its 1st line


def test_single_text_file_trains_with_defaults_and_eval_files_give_validation(tmp_path):
  paragraphs = [f'SPEAKER {i}:\nline of verse {i} ' + 'la ' * (i % 17) for i in range(400)]
  (tmp_path / 'input.txt').write_text('\n\n'.join(paragraphs) + '\n')
  cfg = _cfg(tmp_path, source='text', files=str(tmp_path / 'input.txt'), validation_fraction=0.02)
  train, val = builders.open_split(cfg, 'train'), builders.open_split(cfg, 'validation')
  assert 0 < len(val) < 30 and len(train) + len(val) == len(paragraphs)
  assert sorted([train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]) == sorted(paragraphs)
  pipeline.check_eval_split(cfg)
  assert len(pipeline.make_eval_batches(cfg, TOK, seq_len=32, batch_size=4, num_batches=2)) == 2
  # A named validation file: it is the whole eval split, and all of data.files trains.
  (tmp_path / 'valid.txt').write_text('held out one\n\nheld out two\n')
  cfg.update(eval_files=str(tmp_path / 'valid.txt'), split_by='paragraph')
  train, val = builders.open_split(cfg, 'train'), builders.open_split(cfg, 'validation')
  assert len(train) == len(paragraphs) and [val[i] for i in range(len(val))] == ['held out one', 'held out two']
  batch = pipeline.make_eval_batches(cfg, TOK, seq_len=32, batch_size=2, num_batches=1)[0]
  assert TOK.decode(batch['inputs'][0][1:13]) == 'held out one'
  # No validation documents at all: found by the check that runs before compiling, with advice.
  cfg.update(eval_files='', split_by='file', validation_fraction=0.0)
  with pytest.raises(DataError, match=r"eval split 'validation' .* is empty: give validation files with "
                                      r'data\.eval_files=GLOB'):
    pipeline.check_eval_split(cfg)


def test_cache_key_is_by_content_and_stale_builds_are_removed(tmp_path):
  _write_formats(tmp_path / 'a', DOCS[:5])
  cfg = _cfg(tmp_path, source='jsonl', files=str(tmp_path / 'a' / 'docs.jsonl'))
  first = builders.build_local(cfg)
  shutil.copytree(tmp_path / 'a', tmp_path / 'moved')
  moved = _cfg(tmp_path, source='jsonl', files=str(tmp_path / 'moved' / 'docs.jsonl'))
  assert builders.build_local(moved) == first          # a moved corpus is not rebuilt
  (tmp_path / 'a' / 'docs.jsonl').write_bytes(_jsonl_bytes(DOCS[:6]))
  old = time.time() - 2 * builders.STALE_SECONDS
  os.utime(os.path.join(first, local_build.MANIFEST), (old, old))
  second = builders.build_local(cfg)
  assert second != first and os.listdir(cfg.cache_dir) == [os.path.basename(second)]  # the stale one is gone


def test_parallel_build_matches_in_process(tmp_path, monkeypatch):
  root = tmp_path / 'many'
  root.mkdir()
  for i in range(6):
    (root / f'{i}.jsonl').write_bytes(_jsonl_bytes(DOCS[i * 6:(i + 1) * 6]))
  reader = builders.DocumentReader(sorted(str(p) for p in root.iterdir()), kind='jsonl')
  monkeypatch.setattr(local_build, 'GROUP_BYTES', 1)       # one task per file
  out = {}
  for workers, parallel_from in ((1, 1 << 40), (2, 0)):
    monkeypatch.setattr(local_build, 'PARALLEL_BYTES', parallel_from)
    out[workers] = tmp_path / f'w{workers}'
    out[workers].mkdir()
    tasks = local_build.plan_tasks(reader, 'hash', 0.3, str(out[workers]), 0)
    assert len(tasks) == 6
    results = local_build.run_tasks(tasks, 1 << 20, workers)
    assert local_build.merge_results(results)['counts']['train'] + \
        local_build.merge_results(results)['counts']['validation'] == 36
  for name in sorted(os.listdir(out[1])):
    assert (out[1] / name).read_bytes() == (out[2] / name).read_bytes(), name
  assert sorted(os.listdir(out[1])) == sorted(os.listdir(out[2]))


_MEASURE = r'''
import json, re, sys
from fmjax.config import data_defaults
from fmjax.data import builders

def status(key):  # KiB
  return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1))

cfg = data_defaults()
cfg.update(source=sys.argv[3], files=sys.argv[1], cache_dir=sys.argv[2], validation_fraction=0.01)
builders.local_reader(cfg)  # imports done
base = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')   # reset the peak (VmHWM) to the current RSS
builders.build_local(cfg)
print(json.dumps([base, status('VmHWM')]))
'''


def build_memory(path, cache, source='jsonl'):
  """(RSS before, peak RSS during) a build in a fresh process, in bytes."""
  out = subprocess.run([sys.executable, '-c', _MEASURE, str(path), str(cache), source], capture_output=True,
                       text=True, check=True).stdout
  base, peak = json.loads(out.strip().splitlines()[-1])
  return base * 1024, peak * 1024


def test_build_memory_is_bounded_independent_of_file_size(tmp_path):
  """A 48 MB one-document-per-line JSONL file builds with well under its size of extra memory
  (the old build read it whole, twice: ~4x). The 1 GB figure is in the closing note of issue 17."""
  path = tmp_path / 'big.jsonl'
  line = 'word ' * 20_000
  with open(path, 'w') as f:
    for i in range(480):
      f.write(json.dumps({'text': f'{i} {line}'}) + '\n')
  size = os.path.getsize(path)
  assert size > 45e6
  base, peak = build_memory(path, tmp_path / 'cache')
  assert peak - base < size / 3, (base, peak, size)


def test_files_on_a_stdlib_config_read_those_files(tmp_path):
  """`--config.data.files=input.txt` on configs/default.py (source stdlib) trains on input.txt."""
  (tmp_path / 'input.txt').write_text('\n\n'.join(f'para {i} ' + 'z' * i for i in range(200)))
  cfg = _cfg(tmp_path, files=str(tmp_path / 'input.txt'), validation_fraction=0.02)
  assert cfg.source == 'stdlib'
  train, val = builders.open_split(cfg, 'train'), builders.open_split(cfg, 'validation')
  assert len(train) + len(val) == 200 and len(val) > 0 and train[0].startswith('para ')
  assert os.listdir(cfg.cache_dir)[0].startswith('text-')
