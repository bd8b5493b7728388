"""Tokenizers: exact round trips (byte and SentencePiece), ids, byte lengths, errors, CLI."""

import json
import os
import pickle
import random
import sys

import numpy as np
import pytest

from fmjax.data import corpora
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import CharTokenizer, check_vocab, load_tokenizer, train_char, train_sentencepiece

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'tools'))
import train_tokenizer  # noqa: E402  pylint: disable=wrong-import-position

NON_ASCII = [
    'héllo wörld, façade, naïve; e\u0301 (combining) — “quotes”',
    '日本語のテキスト、中文文本，한국어 텍스트',
    'emoji 😀👍🏽🇯🇵 and zwj 👨\u200d👩\u200d👧',
    '  leading spaces\n\n\ttabs\r\nCRLF  trailing  \n',
    '',
    ' ',
    '\x00\x7f control',
]


def _sample_texts(n=30):
  files = random.Random(0).sample(corpora.stdlib_files(), n)
  return [open(f, encoding='utf-8', errors='replace').read() for f in files]


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  files = random.Random(1).sample(corpora.stdlib_files(), 60)
  out = str(tmp_path_factory.mktemp('sp') / 'bpe.model')
  return train_sentencepiece(files, vocab_size=600, model_type='bpe', output=out)


def _check_round_trip(tok, texts):
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int32
  for text in texts:
    ids = np.asarray(tok.encode(text))
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
    assert tok.decode(ids) == text
    assert int(lengths[ids].sum()) == len(text.encode('utf-8'))


def test_byte_tokenizer_round_trip():
  tok = load_tokenizer('byte')
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.spec, tok.path) == (259, 0, 1, 2, 'byte', None)
  _check_round_trip(tok, _sample_texts() + NON_ASCII)
  assert list(tok.encode('A')) == [ord('A') + 3]
  assert tok.token_byte_lengths()[:3].tolist() == [0, 0, 0]


def test_byte_decode_skips_specials_and_replaces_bad_bytes():
  tok = load_tokenizer('byte')
  assert tok.decode([1, ord('h') + 3, ord('i') + 3, 2, 0]) == 'hi'
  assert tok.decode([0xff + 3, ord('a') + 3]) == '\ufffda'


def test_sentencepiece_round_trip(sp_model):
  tok = load_tokenizer(sp_model)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.spec == tok.path == sp_model and tok.vocab_size == 600
  texts = _sample_texts() + NON_ASCII
  _check_round_trip(tok, texts)
  assert tok.token_byte_lengths()[:4].tolist() == [0, 0, 0, 0]
  code = texts[0]
  assert len(tok.encode(code)) < len(code.encode()) / 2  # it learned something
  clone = pickle.loads(pickle.dumps(tok))
  assert list(clone.encode(code)) == list(tok.encode(code))


def test_train_sentencepiece_from_texts(tmp_path):
  texts = iter(_sample_texts(20))
  path = train_sentencepiece(texts, vocab_size=400, output=str(tmp_path / 't.model'))
  _check_round_trip(load_tokenizer(path), NON_ASCII)


def test_train_sentencepiece_bad_args(tmp_path):
  with pytest.raises(DataError, match='bpe or unigram'):
    train_sentencepiece(['x'], 400, model_type='wordpiece', output=str(tmp_path / 'a.model'))
  with pytest.raises(DataError, match='too small'):
    train_sentencepiece(['x'], 100, output=str(tmp_path / 'a.model'))


def test_missing_or_bad_tokenizer_file(tmp_path):
  with pytest.raises(DataError, match='not found.*data.tokenizer'):
    load_tokenizer(str(tmp_path / 'nope.model'))
  junk = tmp_path / 'junk.model'
  junk.write_bytes(b'not a model')
  with pytest.raises(DataError, match='not a SentencePiece model'):
    load_tokenizer(str(junk))


@pytest.mark.parametrize('name, content, says', [
    ('random.model', random.Random(0).randbytes(4096), 'is not a SentencePiece model'),
    ('text.model', b'hello world, this is text\n', 'is not a SentencePiece model'),
    ('empty.model', b'', 'is not a SentencePiece model (the file is empty)'),
    ('tokenizer.json', b'{"model": {"type": "BPE", "vocab": {', 'is not valid JSON'),
    ('chars.json', b'chars: abc', 'is not valid JSON (Expecting value at line 1 column 1)'),
    ('binary.json', bytes(range(255, -1, -1)) * 2, 'is not a JSON text file'),
])
def test_a_corrupt_tokenizer_file_is_one_line_naming_it_and_what_it_should_be(tmp_path, name, content, says):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(DataError) as e:
    load_tokenizer(str(path))
  msg = str(e.value)
  assert '\n' not in msg and msg.startswith(f'tokenizer {path} ') and says in msg
  assert 'a SentencePiece .model file' in msg and 'tokenizer.json' in msg
  assert '.cc(' not in msg and 'INTERNAL' not in msg and 'ParseFromArray' not in msg   # no C++ source location


def test_check_vocab(sp_model):
  check_vocab(load_tokenizer('byte'), 259)
  with pytest.raises(DataError, match='model.vocab_size=259.*>= 600'):
    check_vocab(load_tokenizer(sp_model), 259)


def test_cli(tmp_path, capsys):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i, text in enumerate(_sample_texts(8)):
    (corpus / f'{i}.txt').write_text(text)
  out = tmp_path / 'cli.model'
  assert train_tokenizer.main(['--input', str(corpus / '*.txt'), '--vocab-size', '400',
                               '--out', str(out)]) == 0
  assert load_tokenizer(str(out)).vocab_size == 400
  assert train_tokenizer.main(['--input', str(tmp_path / 'none/*.txt'), '--vocab-size', '400',
                               '--out', str(out)]) == 2
  assert 'matches no files' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    train_tokenizer.main(['--help'])


CHAR_TEXT = 'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ünïcødé ☃ 😀\n'


def _nanogpt_vocab(text):
  """nanoGPT prepare.py: chars = sorted(list(set(data))); stoi = {ch: i for i, ch in enumerate(chars)}."""
  chars = sorted(list(set(text)))
  return chars, {ch: i for i, ch in enumerate(chars)}


def test_char_tokenizer_matches_nanogpt_and_round_trips(tmp_path):
  (tmp_path / 'input.txt').write_text(CHAR_TEXT, encoding='utf-8')
  train_char([str(tmp_path / 'input.txt')], str(tmp_path / 'chars.json'))
  tok = load_tokenizer(str(tmp_path / 'chars.json'))
  chars, stoi = _nanogpt_vocab(CHAR_TEXT)
  n = len(chars)
  assert isinstance(tok, CharTokenizer) and tok.spec == tok.path == str(tmp_path / 'chars.json')
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (n + 3, n, n + 1, n + 2)
  assert tok.encode(CHAR_TEXT).tolist() == [stoi[c] for c in CHAR_TEXT]
  assert tok.decode(tok.encode(CHAR_TEXT)) == CHAR_TEXT
  assert tok.decode([tok.bos_id, stoi['A'], tok.eos_id, tok.pad_id, 10_000]) == 'A'   # specials dropped
  lengths = tok.token_byte_lengths()
  assert lengths.tolist() == [len(c.encode('utf-8')) for c in chars] + [0, 0, 0]
  assert int(lengths[tok.encode(CHAR_TEXT)].sum()) == len(CHAR_TEXT.encode('utf-8'))
  assert list(pickle.loads(pickle.dumps(tok)).encode('Speak')) == list(tok.encode('Speak'))
  with pytest.raises(DataError) as e:
    tok.encode('Speak?')
  assert "character '?' (U+003F) is not in the char tokenizer" in str(e.value) and '\n' not in str(e.value)


def test_char_tokenizer_is_recognised_by_content(tmp_path):
  path = tmp_path / 'tokenizer.model'       # the name tokenizers.place_in_workdir gives the workdir copy
  path.write_text(json.dumps({'kind': 'char', 'chars': 'ba\n'}))
  tok = load_tokenizer(str(path))
  assert isinstance(tok, CharTokenizer) and tok.chars == '\nab' and tok.vocab_size == 6
  path.write_text(json.dumps({'kind': 'bpe', 'chars': 'ab'}))
  with pytest.raises(DataError, match='not a char tokenizer file'):
    load_tokenizer(str(path))
  path.write_text('{"kind": "char", "chars": "aa"}')
  with pytest.raises(DataError, match='distinct characters'):
    load_tokenizer(str(path))
  check_vocab(CharTokenizer('abc'), 6)
  with pytest.raises(DataError, match='model.vocab_size=5.*>= 6'):
    check_vocab(CharTokenizer('abc'), 5)


def test_char_cli(tmp_path, capsys):
  (tmp_path / 'input.txt').write_text(CHAR_TEXT)
  out = tmp_path / 'chars.json'
  argv = ['--model-type', 'char', '--input', str(tmp_path / 'input.txt'), '--out', str(out)]
  assert train_tokenizer.main(argv) == 0
  n = len(set(CHAR_TEXT))
  assert f'vocab {n + 3}' in capsys.readouterr().out
  assert json.loads(out.read_text(encoding='utf-8')) == {'kind': 'char', 'chars': ''.join(sorted(set(CHAR_TEXT)))}
  (tmp_path / 'input.txt').write_bytes(b'\x89PNG\x00\x00')
  assert train_tokenizer.main(argv) == 2
  err = capsys.readouterr().err
  assert 'input.txt is binary' in err and err.count('\n') == 1   # binary input refused, named, one line
  assert train_tokenizer.main(argv + ['--vocab-size', '100']) == 2
  assert train_tokenizer.main(['--model-type', 'char', '--input', 'x', '--out', str(tmp_path / 'c.model')]) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 2 and '--vocab-size does not apply' in errors[0] and 'should end in .json' in errors[1]


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_char_tokenizer_trains_and_restores_from_the_workdir(tmp_path):
  """tokenizers.place_in_workdir copies the JSON into the workdir; restore loads it back, same characters."""
  from fmjax import train
  from fmjax.checkpoints import restore
  from helpers import tiny_config
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a.txt').write_text(''.join(f'{CHAR_TEXT}line {i}\n\n' for i in range(30)))
  train_char([str(corpus / 'a.txt')], str(tmp_path / 'chars.json'))
  vocab = load_tokenizer(str(tmp_path / 'chars.json')).vocab_size
  cfg = tiny_config(vocab_size=vocab)
  cfg.mesh.update(dict(data=8, fsdp=1, tensor=1))
  cfg.data.update(dict(source='text', files=str(corpus / '*.txt'), split_by='paragraph',
                       tokenizer=str(tmp_path / 'chars.json'), cache_dir=str(tmp_path / 'cache'),
                       validation_fraction=0.0))
  cfg.update(dict(steps=2, checkpoint_every=0, async_checkpoints=False, workdir=str(tmp_path / 'w'),
                  cpu_peak_flops=1e11))
  train.train(cfg)
  restored = restore.restore(str(tmp_path / 'w'))
  assert isinstance(restored.tokenizer, CharTokenizer)
  assert restored.tokenizer.chars == ''.join(sorted(set(CHAR_TEXT + 'line 0123456789')))
  assert restored.tokenizer.vocab_size == vocab


def _jsonl(path, texts):
  import gzip
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({'body': t, 'meta': '{"not": "text"}'}) + '\n')


def test_cli_reads_jsonl_and_parquet_fields_not_json_syntax(tmp_path, capsys):
  import pyarrow as pa
  import pyarrow.parquet as pq
  texts = _sample_texts(8)
  _jsonl(tmp_path / 'a.jsonl.gz', texts[:4])
  pq.write_table(pa.table({'body': texts[4:]}), tmp_path / 'b.parquet')
  out = tmp_path / 'mix.json'
  argv = ['--model-type', 'char', '--mixture', f'a:1:{tmp_path}/a.jsonl.gz,b:1:{tmp_path}/b.parquet',
          '--field', 'body', '--out', str(out)]
  assert train_tokenizer.main(argv) == 0
  chars = json.loads(out.read_text(encoding='utf-8'))['chars']
  assert chars == ''.join(sorted(set(''.join(texts))))   # the field's text only: no JSON quotes/braces
  assert 'from 8 documents' in capsys.readouterr().out


def test_long_lines_are_split_and_counted_not_skipped(tmp_path, capsys):
  from fmjax.data import tokenizer_inputs
  long_line = ' '.join(f'w{i}' for i in range(9000))          # ~50 KB: SentencePiece would skip it
  stats = tokenizer_inputs.LineStats()
  lines = list(tokenizer_inputs.training_lines(['short one\n\n' + long_line, 'é' * 9000], stats))
  assert lines[0] == 'short one' and ''.join(lines[1:-2]) == long_line and ''.join(lines[-2:]) == 'é' * 9000
  assert all(len(line.encode('utf-8')) <= tokenizer_inputs.MAX_LINE_BYTES for line in lines)
  assert all(p.endswith(' ') for p in lines[1:-3])                    # cut at whitespace
  assert (stats.documents, stats.split_lines, stats.pieces) == (2, 2, len(lines) - 1)
  others = [t for t in _sample_texts(20) if t.strip()]   # (stdlib files may be empty)
  _jsonl(tmp_path / 'long.jsonl.gz', [long_line] + others)
  out = tmp_path / 'long.model'
  assert train_tokenizer.main(['--input', str(tmp_path / '*.jsonl.gz'), '--field', 'body', '--vocab-size', '400',
                               '--out', str(out)]) == 0
  printed = capsys.readouterr().out
  assert f'from {len(others) + 1} documents' in printed and '1 lines over 16 KiB were split into 4 pieces' in printed
  tok = load_tokenizer(str(out))
  assert tok.decode(tok.encode(long_line)) == long_line


def test_documents_are_sampled_evenly_across_files(tmp_path):
  from fmjax.data import tokenizer_inputs
  for f in range(8):   # 8 files: two seeds give the same file order with odds 1/8! (4 files: 1/24, a flaky test)
    (tmp_path / f'{f}.jsonl').write_text(''.join(json.dumps({'text': f'f{f} d{d}'}) + '\n' for d in range(10)))
  docs = list(tokenizer_inputs.sample_documents(str(tmp_path / '*.jsonl'), max_documents=16))
  assert len(docs) == 16 and sorted({d.split()[0] for d in docs}) == [f'f{f}' for f in range(8)]
  assert docs == list(tokenizer_inputs.sample_documents(str(tmp_path / '*.jsonl'), max_documents=16))
  assert docs != list(tokenizer_inputs.sample_documents(str(tmp_path / '*.jsonl'), max_documents=16, seed=1))
