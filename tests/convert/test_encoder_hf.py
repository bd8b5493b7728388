"""BERT / RoBERTa interop: tiny random BertForMaskedLM and RobertaForMaskedLM made by transformers
here; from-hf logits, to-hf logits in transformers, exact round trips, WordPiece / byte-level BPE
tokenizers through fmjax's tokenizer layer."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers_lib = pytest.importorskip('tokenizers')
from safetensors.numpy import load_file  # noqa: E402

from fmjax.convert import ConversionError, driver, source, verify  # noqa: E402
from fmjax.convert.families.bert import BERT, ROBERTA  # noqa: E402
from fmjax.data import tokenizers as fm_tokenizers  # noqa: E402
from helpers import assert_same_tree  # noqa: E402

WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hum jazz def return self'.split()
TEXTS = ['The quick brown fox jumps over the lazy dog.', 'seven wizards hum jazz, quietly!',
         'def jumps(self): return self.fox', 'unknownword zzz qqq']


def _bert_tokenizer(path):
  """A WordPiece tokenizer (BertTokenizerFast from a small vocab.txt), saved in `path`."""
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list('abcdefghijklmnopqrstuvwxyz.,!():') + \
      [f'##{c}' for c in 'abcdefghijklmnopqrstuvwxyz'] + WORDS
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(vocab) + '\n')
  tok = transformers.BertTokenizerFast(os.path.join(path, 'vocab.txt'))
  tok.save_pretrained(path)
  return tok


def _roberta_tokenizer(path):
  """A byte-level BPE tokenizer (RobertaTokenizerFast), trained by `tokenizers` on a few lines."""
  bpe = tokenizers_lib.ByteLevelBPETokenizer()
  bpe.train_from_iterator([' '.join(WORDS)] * 20 + TEXTS * 5, vocab_size=300, min_frequency=1,
                          special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
  os.makedirs(path, exist_ok=True)
  bpe.save_model(str(path))
  tok = transformers.RobertaTokenizerFast(os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt'))
  tok.save_pretrained(path)
  return tok


def _hf_model(kind, path, vocab_size):
  torch.manual_seed(0)
  common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  if kind == 'bert':
    model = transformers.BertForMaskedLM(transformers.BertConfig(max_position_embeddings=40, type_vocab_size=2,
                                                                 **common))
  else:
    model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        max_position_embeddings=42, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common))
  with torch.no_grad():   # perturb every weight (norms, biases and the MLM bias too)
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def _hf_logits(model, tokens, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {'attention_mask': torch.as_tensor(mask)}
    return model(torch.as_tensor(tokens, dtype=torch.long), **kw).logits.numpy()


def _tokens(vocab_size, avoid=(0, 1, 2)):
  """Random ids without pad/specials (RoBERTa numbers positions around its pad id)."""
  tokens = verify.sample_tokens(vocab_size, 32, length=24)
  return np.where(np.isin(tokens, avoid), 5, tokens)


@pytest.fixture(scope='module', params=['bert', 'roberta'])
def imported(request, tmp_path_factory):
  kind = request.param
  root = tmp_path_factory.mktemp(kind)
  hf_dir = str(root / 'hf')
  tok = (_bert_tokenizer if kind == 'bert' else _roberta_tokenizer)(hf_dir)
  model = _hf_model(kind, hf_dir, len(tok))
  out = driver.from_hf(hf_dir, str(root / 'fm'), scan_layers=kind == 'bert')
  return dict(kind=kind, root=root, hf_dir=hf_dir, tok=tok, model=model, out=out)


def test_from_hf_logits_match_transformers(imported):
  out, model = imported['out'], imported['model']
  m = out['model']
  assert m.kind == 'encoder' and m.norm_position == 'post' and m.activation == 'gelu_exact'
  assert m.position_offset == (2 if imported['kind'] == 'roberta' else 0)
  assert out['family'] is (ROBERTA if imported['kind'] == 'roberta' else BERT)
  tokens = _tokens(m.vocab_size)
  diff = np.abs(verify.fmjax_logits(out['params'], m, tokens) - _hf_logits(model, tokens)).max()
  print(f'{imported["kind"]} HF -> fmjax: max abs logits diff {diff:.3g}')
  assert diff < 1e-4


def test_padding_is_masked_like_the_hf_attention_mask(imported):
  """A padded row: fmjax's segment ids (0 = padding) and HF's attention_mask give the same logits
  at the real tokens."""
  from fmjax.model import Transformer
  out, model = imported['out'], imported['model']
  m = out['model']
  tokens = _tokens(m.vocab_size)
  pad = 1 if imported['kind'] == 'roberta' else 0
  mask = np.ones_like(tokens)
  mask[0, 15:] = 0
  tokens[0, 15:] = pad
  seg = mask.astype(np.int32)
  pos = np.tile(np.arange(tokens.shape[1]), (tokens.shape[0], 1))
  cfg = m.copy_and_resolve_references()
  cfg.attention = 'xla'
  fm = Transformer(cfg).apply({'params': out['params']}, tokens, pos, seg)
  hf = _hf_logits(model, tokens, mask)
  np.testing.assert_allclose(np.asarray(fm)[mask > 0], hf[mask > 0], atol=1e-4)


def test_to_hf_loads_in_transformers_and_round_trips_bit_identically(imported):
  root, out = imported['root'], imported['out']
  src = source.open_source(str(root / 'fm'))
  exported = driver.to_hf(src, str(root / 'export'))
  hf = transformers.AutoModelForMaskedLM.from_pretrained(str(root / 'export'), use_safetensors=True)
  hf.eval()
  assert type(hf).__name__ == exported['family'].ARCHITECTURE
  tokens = _tokens(out['model'].vocab_size)
  diff = np.abs(verify.fmjax_logits(out['params'], out['model'], tokens) - _hf_logits(hf, tokens)).max()
  print(f'{imported["kind"]} fmjax -> HF: max abs logits diff {diff:.3g}')
  assert diff < 1e-4
  # HF -> fmjax -> HF: every tensor of the original file, bit for bit (tied copies are not stored)
  original = load_file(os.path.join(imported['hf_dir'], 'model.safetensors'))
  again = load_file(os.path.join(str(root / 'export'), 'model.safetensors'))
  for name, value in original.items():
    if name.endswith('position_ids'):
      continue
    assert name in again, name
    assert np.array_equal(value.view(np.uint8), again[name].view(np.uint8)), name
  # fmjax -> HF -> fmjax: the params tree, bit for bit
  back = driver.from_hf(str(root / 'export'), str(root / 'back'), scan_layers=out['model'].scan_layers)
  assert_same_tree(back['params'], out['params'])


def test_tokenizer_through_the_tokenizer_layer(imported):
  """WordPiece (BERT) / byte-level BPE (RoBERTa) imported with the model encode as transformers does,
  and the export gives AutoTokenizer the same ids."""
  root, tok = imported['root'], imported['tok']
  src = source.open_source(str(root / 'fm'))
  fm_tok = fm_tokenizers.load_tokenizer(os.path.join(str(root / 'fm'), src.tokenizer))
  for text in TEXTS:
    want = tok(text, add_special_tokens=False)['input_ids']
    assert fm_tok.encode(text).tolist() == want, text
  assert fm_tok.pad_id == tok.pad_token_id
  if imported['kind'] == 'bert':
    assert (fm_tok.bos_id, fm_tok.eos_id) == (tok.cls_token_id, tok.sep_token_id)
  exported = transformers.AutoTokenizer.from_pretrained(str(root / 'export'))
  for text in TEXTS:
    assert exported(text)['input_ids'] == tok(text)['input_ids'], text


def test_family_checks():
  from helpers import tiny_config
  decoder = tiny_config(activation='gelu', norm='layernorm', positions='learned', use_bias=True).model
  assert 'kind' in BERT.mismatch(decoder)
  encoder = tiny_config(kind='encoder', activation='gelu_exact', norm='layernorm', norm_position='post',
                        positions='learned', use_bias=True, type_vocab_size=2, num_kv_heads=0).model
  assert BERT.mismatch(encoder) is None and 'position_offset' in ROBERTA.mismatch(encoder)
  assert driver.pick_family(encoder) is BERT
  with pytest.raises(ConversionError, match='hidden_act'):
    BERT.from_hf_config(dict(hidden_act='relu'))
  with pytest.raises(ConversionError, match='position_embedding_type'):
    BERT.from_hf_config(dict(position_embedding_type='relative_key'))
  assert driver.family_for({'architectures': ['RobertaForMaskedLM']}) is ROBERTA
