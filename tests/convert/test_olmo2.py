"""OLMo 2 converts both ways: tiny random transformers Olmo2ForCausalLM models (GQA, tied and untied heads, every
weight perturbed, norms included) give fmjax's logits under the xla, dense and chunked implementations, each of
OLMo 2's two block features (norms after the sublayers, q/k norms over the whole projection) bites, greedy
decoding equals transformers', exports load as Olmo2ForCausalLM with the same logits and round-trip bitwise,
what fmjax lacks is refused in one line, and an OLMo 2-shaped model is never exported as another family."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from fmjax.config import base_config  # noqa: E402
from fmjax.convert import driver, families, source, verify  # noqa: E402
from fmjax.convert.families import gemma, llama, olmo2, qwen3  # noqa: E402
from fmjax.model.transformer import Transformer  # noqa: E402
from helpers import assert_same_tree  # noqa: E402
from hf_models import greedy_pair, imported_models, one_line as _one_line, verify_import  # noqa: E402

T = 24
# rope_theta=500 over 24 positions: RoPE rotates q and k a lot, so q/k norms after RoPE would not match.
COMMON = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-6,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {'olmo2': dict(tie_word_embeddings=False), 'olmo2_tied': dict(tie_word_embeddings=True)}


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """name -> (transformers model, its directory, the from-hf result), each made once."""
  return imported_models(tmp_path_factory,
                         lambda name: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**COMMON, **CASES[name])))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _logits(params, model_cfg, tokens, **options):
  """fp32 fmjax logits under `options` (verify.fmjax_logits always runs attention=xla)."""
  cfg = model_cfg.copy_and_resolve_references()
  cfg.update(dict(dict(dtype='float32', param_dtype='float32', attention='xla', remat='none'), **options))
  return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))(params, jnp.asarray(tokens)))


@pytest.mark.parametrize('name', list(CASES))
def test_import_matches_transformers_under_each_implementation(imported, name):
  model, _, out = imported(name)
  m = out['model']
  assert out['family'].NAME == 'olmo2' and m.tie_embeddings == name.endswith('_tied')
  assert (m.norm_position, m.qk_norm, m.qk_norm_scope, m.num_kv_heads) == ('after', True, 'all', 2)
  assert out['params']['layers']['attn']['q_norm']['scale'].shape == (2, 4 * 8)      # scanned: (layers, h * hd)
  assert out['params']['layers']['attn']['k_norm']['scale'].shape == (2, 2 * 8)
  tokens = verify.sample_tokens(m.vocab_size, T, length=T)
  want = _hf_logits(model, tokens)
  for attention in ('xla', 'dense', 'chunked'):
    diff = np.abs(_logits(out['params'], m, tokens, attention=attention, attention_chunk=4) - want).max()
    print(f'{name}: attention={attention}: max abs diff {diff:.3g}')
    assert diff < 1e-4, (attention, diff)
  # each feature bites: the same scales before the sublayers (norm_position=pre), or the first head's
  # scales on every head (qk_norm_scope=head), change the logits
  params = out['params']
  layers = dict(params['layers'])
  layers.update(attn_norm=layers.pop('attn_post_norm'), mlp_norm=layers.pop('mlp_post_norm'))
  pre = _logits(dict(params, layers=layers), m, tokens, norm_position='pre')
  attn = dict(params['layers']['attn'])
  attn.update(q_norm={'scale': attn['q_norm']['scale'][:, :8]}, k_norm={'scale': attn['k_norm']['scale'][:, :8]})
  per_head = _logits(dict(params, layers=dict(params['layers'], attn=attn)), m, tokens, qk_norm_scope='head')
  for what, got in (('norm_position=pre', pre), ('qk_norm_scope=head', per_head)):
    diff = np.abs(got - want).max()
    print(f'{name}: {what}: max abs diff {diff:.3g}')
    assert diff > 1e-3, what


def test_greedy_decoding_matches_transformers(imported):
  model, base, _ = imported('olmo2')
  _, got, want = greedy_pair(model, base / 'fm', 'the quick', 64)
  assert len(want) == 64 and got == want


@pytest.mark.parametrize('name', list(CASES))
def test_export_loads_as_olmo2_and_round_trips(imported, name):
  model, base, out = imported(name)
  exported = driver.to_hf(source.open_source(str(base / 'fm')), str(base / 'export'), log=lambda s: None)
  with open(base / 'export' / 'config.json') as f:
    assert json.load(f)['model_type'] == 'olmo2'
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base / 'export'), use_safetensors=True)
  hf.eval()
  assert type(hf) is transformers.Olmo2ForCausalLM and exported['family'] is olmo2
  tokens = verify.sample_tokens(out['model'].vocab_size, T, length=T)
  fm = _logits(out['params'], out['model'], tokens)
  diff = np.abs(_hf_logits(hf, tokens) - fm).max()
  print(f'{name}: export: fmjax vs transformers max abs diff {diff:.3g}')
  assert diff < 1e-5, diff
  back = driver.from_hf(str(base / 'export'), str(base / 'back'), log=lambda s: None)
  assert_same_tree(back['params'], out['params'])
  assert families.pick_family(out['model']) is olmo2


def test_what_fmjax_lacks_is_refused_in_one_line():
  base = dict(COMMON, model_type='olmo2', hidden_act='silu')
  _one_line(lambda: olmo2.from_hf_config(dict(base, hidden_act='gelu')), "hidden_act='gelu'")
  _one_line(lambda: olmo2.from_hf_config(dict(base, attention_bias=True)), 'attention_bias=True')
  _one_line(lambda: olmo2.from_hf_config(dict(base, rope_parameters=dict(rope_type='linear', factor=2.0,
                                                                          rope_theta=500.0))),
            "rope_parameters.rope_type='linear'")
  _one_line(lambda: olmo2.from_hf_config(dict(base, rope_scaling=dict(type='dynamic', factor=2.0))),
            "rope_scaling.rope_type='dynamic'")


def test_an_olmo2_model_is_exported_as_no_other_family():
  m = base_config().model
  m.update(olmo2.from_hf_config(dict(COMMON, model_type='olmo2')))
  assert olmo2.mismatch(m) is None and families.pick_family(m) is olmo2
  assert 'model.norm_position' in llama.mismatch(m) and 'model.qk_norm_scope' in llama.mismatch(m)
  assert 'model.qk_norm_scope' in qwen3.mismatch(m) and 'model.norm_position' in qwen3.mismatch(m)
  assert 'model.qk_norm_scope' in gemma.Gemma3.mismatch(m)
  for feature, words in ((dict(norm_position='pre'), 'model.norm_position'),
                         (dict(qk_norm_scope='head'), 'model.qk_norm_scope'),
                         (dict(rope_scaling='linear'), 'model.rope_scaling'),
                         (dict(embed_scale=True), 'a Gemma feature')):
    other = m.copy_and_resolve_references()
    other.update(feature)
    assert words in (olmo2.mismatch(other) or ''), feature
  # one OLMo 2 feature alone is still no Llama / Qwen3: each is refused
  for feature in (dict(norm_position='after', qk_norm=False), dict(qk_norm=True, qk_norm_scope='all')):
    other = base_config().model
    other.update(feature)
    assert llama.mismatch(other) and qwen3.mismatch(other) and gemma.Gemma3.mismatch(other), feature


def test_from_hf_verify_passes_against_float64(imported, tmp_path, capsys):
  _, base, _ = imported('olmo2')
  print(verify_import(base / 'hf', tmp_path / 'v', capsys, 0))
