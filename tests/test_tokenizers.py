"""Tokenizers: exact round trips (byte and SentencePiece), ids, byte lengths, errors, CLI."""

import os
import pickle
import random
import sys

import numpy as np
import pytest

from fmjax.data import corpora
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import check_vocab, load_tokenizer, train_sentencepiece

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
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
                               '--output', str(out)]) == 0
  assert load_tokenizer(str(out)).vocab_size == 400
  assert train_tokenizer.main(['--input', str(tmp_path / 'none/*.txt'), '--vocab-size', '400',
                               '--output', str(out)]) == 2
  assert 'matches no files' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    train_tokenizer.main(['--help'])
