"""The Hugging Face tokenizer.json kind: loading by content, special tokens, exact round trips, byte
lengths, pickling, placing in a workdir; byte-level (GPT-2, Llama 3) and SentencePiece-style (Mistral)."""

import json
import os
import pickle

import numpy as np
import pytest

hf = pytest.importorskip('tokenizers')

from fmjax.data import tokenizers  # noqa: E402
from fmjax.data.errors import DataError  # noqa: E402

TEXTS = ['def foo(x):\n    return x + 1  # hi\n', 'The quick brown fox. ' * 3, 'naïve café 日本語 😀',
         '  two  spaces']


def byte_level(path, specials=('<|begin_of_text|>', '<|end_of_text|>')):
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 20, hf.trainers.BpeTrainer(
      vocab_size=320, special_tokens=list(specials), initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, 'tokenizer.json'))
  return os.path.join(path, 'tokenizer.json')


def sentencepiece_style(path):
  """Mistral / Llama 2 style: Metaspace pre-tokenizer, byte fallback, <s> </s> <unk>."""
  tok = hf.Tokenizer(hf.models.BPE(byte_fallback=True, unk_token='<unk>'))
  tok.pre_tokenizer = hf.pre_tokenizers.Metaspace(prepend_scheme='never')
  tok.decoder = hf.decoders.Sequence([hf.decoders.Replace('\u2581', ' '), hf.decoders.ByteFallback(),
                                      hf.decoders.Fuse()])
  bytes_ = [f'<0x{b:02X}>' for b in range(256)]
  tok.train_from_iterator(TEXTS * 20, hf.trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<unk>', '<s>', '</s>'] + bytes_, show_progress=False))
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, 'tokenizer.json'))
  return os.path.join(path, 'tokenizer.json')


@pytest.mark.parametrize('make', [byte_level, sentencepiece_style])
def test_round_trip_byte_lengths_and_pickle(tmp_path, make):
  tok = tokenizers.load_tokenizer(make(str(tmp_path / 'tok')))   # told apart from a char JSON by content
  assert isinstance(tok, tokenizers.HFTokenizer)
  lengths = tok.token_byte_lengths()
  for text in TEXTS + ['unseen: ÆØÅ ∑ 🙂']:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(lengths[ids].sum()) == len(text.encode('utf-8')), text
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(TEXTS[0]).tolist() == tok.encode(TEXTS[0]).tolist() and clone.eos_id == tok.eos_id
  assert lengths[tok.eos_id] == 0


def test_special_tokens_from_config_else_known_names(tmp_path):
  path = byte_level(str(tmp_path / 'a'))
  tok = tokenizers.load_tokenizer(path)      # no config: the Llama 3 names are recognised
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
  assert (tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, None)    # encoder specials fall back to bos/eos
  with open(tmp_path / 'a' / 'tokenizer_config.json', 'w') as f:
    json.dump({'bos_token': '<|end_of_text|>', 'eos_token': {'content': '<|begin_of_text|>'}}, f)
  tok = tokenizers.load_tokenizer(path)
  assert (tok.bos_id, tok.eos_id) == (1, 0)
  bare = byte_level(str(tmp_path / 'b'), specials=('<x>',))
  with pytest.raises(DataError, match='no end-of-text token'):
    tokenizers.load_tokenizer(bare)


def test_place_in_workdir_keeps_config_files(tmp_path):
  path = byte_level(str(tmp_path / 'src'))
  with open(tmp_path / 'src' / 'tokenizer_config.json', 'w') as f:
    json.dump({'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>'}, f)
  os.rename(path, tmp_path / 'src' / 'my.json')              # any file name
  tok = tokenizers.load_tokenizer(str(tmp_path / 'src' / 'my.json'))
  spec = tokenizers.place_in_workdir(tok, str(tmp_path / 'run'))
  assert spec == 'hf_tokenizer/tokenizer.json'
  assert sorted(os.listdir(tmp_path / 'run' / 'hf_tokenizer')) == ['tokenizer.json', 'tokenizer_config.json']
  again = tokenizers.load_tokenizer(str(tmp_path / 'run' / spec))
  assert again.encode(TEXTS[2]).tolist() == tok.encode(TEXTS[2]).tolist() and again.eos_id == tok.eos_id


def test_char_tokenizer_json_still_loads_as_char(tmp_path):
  path = str(tmp_path / 'chars.json')
  tokenizers.train_char([__file__], path)
  assert isinstance(tokenizers.load_tokenizer(path), tokenizers.CharTokenizer)
  assert np.all(tokenizers.load_tokenizer(path).encode('def') >= 0)
