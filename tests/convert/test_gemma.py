"""Gemma 2 and Gemma 3 (text) convert both ways: tiny random transformers models with every Gemma feature
switched on at non-default values (window 4 on 24-token rows, alternating or 5:1 local/global layers,
soft-caps that bite, query_pre_attn_scalar != head_dim, GQA, perturbed (1 + w) norms, a local RoPE base)
give fmjax's logits under every CPU attention implementation, decode greedily as transformers does past
the window, export as the same class with the same logits, and round-trip bitwise."""

import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from fmjax.convert import ConversionError, driver, families, source, verify  # noqa: E402
from fmjax.convert.families import gemma, llama  # noqa: E402
from helpers import assert_same_tree  # noqa: E402
from hf_models import greedy_pair, imported_models, verify_import  # noqa: E402

WINDOW, T = 4, 24
COMMON = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, query_pre_attn_scalar=12, max_position_embeddings=128, sliding_window=WINDOW,
              rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {
    'gemma2': (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(num_hidden_layers=4, rope_theta=500.0, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    'gemma3': (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(num_hidden_layers=7,
                    layer_types=['sliding_attention'] * 5 + ['full_attention', 'sliding_attention'],
                    rope_parameters={'full_attention': dict(rope_type='default', rope_theta=1000.0),
                                     'sliding_attention': dict(rope_type='default', rope_theta=50.0)})),
}
PATTERNS = {'gemma2': 'LG', 'gemma3': 'LLLLLG'}


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  def build(name):
    config_cls, model_cls, options = CASES[name]
    return model_cls(config_cls(**COMMON, **options))
  return imported_models(tmp_path_factory, build)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize('name', list(CASES))
def test_import_matches_transformers_under_each_implementation(imported, name):
  model, _, out = imported(name)
  m = out['model']
  assert out['family'].NAME == name and m.window_pattern == PATTERNS[name] and m.sliding_window == WINDOW
  assert (m.norm_position, m.activation, m.norm_unit_offset, m.embed_scale, m.query_scale_dim) == \
      ('sandwich', 'geglu', True, True, 12)
  if name == 'gemma2':
    assert (m.attn_logit_softcap, m.final_logit_softcap, m.qk_norm) == (2.0, 3.0, False)
  else:
    assert (m.rope_theta, m.rope_local_theta, m.qk_norm) == (1000.0, 50.0, True)
  tokens = verify.sample_tokens(m.vocab_size, T, length=T)
  want = _hf_logits(model, tokens)
  for attention in ('xla', 'dense', 'chunked'):
    cfg = m.copy_and_resolve_references()
    cfg.update(dict(attention=attention, attention_chunk=4))
    diff = np.abs(verify.fmjax_logits(out['params'], cfg, tokens, attention=attention) - want).max()
    print(f'{name}: attention={attention}: max abs diff {diff:.3g}')
    assert diff < 1e-4, (attention, diff)
  for feature in (dict(window_pattern=''), dict(sliding_window=0, window_pattern=''), dict(embed_scale=False),
                  dict(query_scale_dim=0), dict(attn_logit_softcap=0.0, final_logit_softcap=0.0, rope_local_theta=0.0)):
    cfg = m.copy_and_resolve_references()
    cfg.update(feature)
    assert np.abs(verify.fmjax_logits(out['params'], cfg, tokens) - want).max() > 1e-3, feature   # each one bites


@pytest.mark.parametrize('name', list(CASES))
def test_from_hf_verify_passes_against_float64_past_the_window(imported, name, tmp_path, capsys):
  _, base, _ = imported(name)
  print(verify_import(base / 'hf', tmp_path / 'v', capsys, WINDOW))


@pytest.mark.parametrize('name', list(CASES))
def test_greedy_decoding_past_the_window_matches_transformers(imported, name):
  model, base, _ = imported(name)
  ids, got, want = greedy_pair(model, base / 'fm', 'the quick', 64)
  assert len(ids) + 64 > 6 * WINDOW and got == want


@pytest.mark.parametrize('name', list(CASES))
def test_export_loads_as_the_same_class_and_round_trips(imported, name):
  model, base, out = imported(name)
  driver.to_hf(source.open_source(str(base / 'fm')), str(base / 'export'), log=lambda s: None)
  with open(base / 'export' / 'config.json') as f:
    exported = json.load(f)
  assert exported['model_type'] == model.config.model_type and exported['layer_types'] == model.config.layer_types
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base / 'export'), use_safetensors=True)
  hf.eval()
  assert type(hf) is type(model)
  tokens = verify.sample_tokens(out['model'].vocab_size, T, length=T)
  assert np.abs(_hf_logits(hf, tokens) - _hf_logits(model, tokens)).max() < 1e-5
  back = driver.from_hf(str(base / 'export'), str(base / 'back'), log=lambda s: None)
  assert_same_tree(back['params'], out['params'])
  assert families.pick_family(out['model']).NAME == name


def test_what_fmjax_lacks_is_refused_in_one_line():
  base = dict(COMMON, num_hidden_layers=4, model_type='gemma2', hidden_activation='gelu_pytorch_tanh')
  cases = [
      (gemma.Gemma2, dict(base, hidden_activation='relu'), "hidden_activation='relu'"),
      (gemma.Gemma2, dict(base, layer_types=['sliding_attention', 'full_attention', 'full_attention', 'bogus']),
       'layer_types must list'),
      (gemma.Gemma2, dict(base, tie_word_embeddings=False), 'tie_word_embeddings=False'),
      (gemma.Gemma3, dict(base, model_type='gemma3_text', layer_types=['sliding_attention'] * 4,
                          rope_parameters={'full_attention': dict(rope_type='linear', factor=8.0, rope_theta=1e6),
                                           'sliding_attention': dict(rope_type='default', rope_theta=1e4)}),
       "rope_parameters.full_attention.rope_type='linear'"),
      (gemma.Gemma3, dict(base, model_type='gemma3_text', layer_types=['sliding_attention'] * 4,
                          final_logit_softcapping=30.0), 'final_logit_softcapping=30.0'),
  ]
  for fam, hf, words in cases:
    with pytest.raises(ConversionError) as err:
      fam.from_hf_config(dict(hf, layer_types=hf.get('layer_types', ['sliding_attention', 'full_attention'] * 2)))
    assert words in str(err.value) and '\n' not in str(err.value), str(err.value)
  assert gemma.pattern_of(['sliding_attention'] * 5 + ['full_attention'] + ['sliding_attention'] * 2, 8, 'x') == \
      'LLLLLG'
  assert gemma.pattern_of(['sliding_attention'] * 3, 3, 'x') == ''
  # a Gemma model is not exported as Llama (whose config has none of these fields)
  m = gemma.Gemma2.from_hf_config(dict(base, layer_types=['sliding_attention', 'full_attention'] * 2))
  from fmjax.config import base_config
  model_cfg = base_config().model
  model_cfg.update(m)
  assert 'model.norm_position' in llama.mismatch(model_cfg) and gemma.Gemma2.mismatch(model_cfg) is None
