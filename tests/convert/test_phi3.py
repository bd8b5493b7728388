"""Phi-3 (fused qkv_proj and gate_up_proj, the LLaMA layout otherwise, a sliding window on every layer) converts
both ways: logits agree with transformers (window 8 on 32 tokens, tied and untied), greedy decoding past the
window matches, `--family phi3` exports a Phi3ForCausalLM with the same logits and a bitwise round trip while a
Llama-shaped model still exports as Llama by default, and what fmjax lacks is refused in one line naming the key."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from fmjax.convert import ConversionError, driver, families, source, verify  # noqa: E402
from fmjax.convert.families import llama, phi3, qwen2  # noqa: E402
from helpers import assert_same_tree, tiny_config  # noqa: E402
from hf_models import greedy_pair, imported_models, one_line as _one_line, verify_import  # noqa: E402

WINDOW, T = 8, 32
COMMON = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-6,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {   # name -> options: GQA everywhere; a window of 8 on 32 tokens, tied and untied; no window
    'window': dict(sliding_window=WINDOW, tie_word_embeddings=False),
    'window_tied': dict(sliding_window=WINDOW, tie_word_embeddings=True),
    'full': dict(sliding_window=None, tie_word_embeddings=False),
}


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """name -> (perturbed transformers Phi3ForCausalLM, its base directory, the from-hf result), each made once."""
  return imported_models(tmp_path_factory,
                         lambda name: transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, **CASES[name])))


@pytest.mark.parametrize('name', list(CASES))
def test_import_export_and_round_trip(imported, name):
  model, base, out = imported(name)
  m = out['model']
  window = CASES[name]['sliding_window'] or 0
  assert out['family'] is phi3 and m.sliding_window == window and m.num_kv_heads == 2
  assert m.tie_embeddings == name.endswith('_tied') and m.norm_eps == 1e-6 and m.rope_theta == 500.0
  with open(base / 'hf' / 'config.json') as f:
    written = json.load(f)
  assert 'model.layers.0.self_attn.qkv_proj.weight' in dict(model.named_parameters()) and written['model_type'] == 'phi3'
  tokens = verify.sample_tokens(m.vocab_size, T)
  want = hf_logits(model, tokens)
  fm = verify.fmjax_logits(out['params'], m, tokens)
  diff_import = np.abs(fm - want).max()
  assert diff_import < 1e-4, diff_import
  if window:   # the window is what makes the match: off, it does not
    full = m.copy_and_resolve_references()
    full.sliding_window = 0
    assert np.abs(verify.fmjax_logits(out['params'], full, tokens) - want).max() > 1e-2

  exported = driver.to_hf(source.open_source(str(base / 'fm')), str(base / 'export'), family='phi3',
                          log=lambda s: None)
  with open(base / 'export' / 'config.json') as f:
    cfg = json.load(f)
  assert (cfg['model_type'], cfg['architectures'], cfg['sliding_window']) == ('phi3', ['Phi3ForCausalLM'],
                                                                             window or None)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base / 'export'), use_safetensors=True)
  hf.eval()
  assert type(hf) is transformers.Phi3ForCausalLM and exported['family'] is phi3
  assert hf.config.sliding_window == (window or None)
  diff_export = np.abs(fm - hf_logits(hf, tokens)).max()
  print(f'phi3 {name}: fmjax vs transformers {diff_import:.3g} (import), {diff_export:.3g} (export)')
  assert diff_export < 1e-5, diff_export
  back = driver.from_hf(str(base / 'export'), str(base / 'back'), log=lambda s: None)
  assert back['family'] is phi3 and back['model'].sliding_window == window
  assert_same_tree(back['params'], out['params'])


def test_greedy_decoding_past_the_window_matches_transformers(imported):
  model, base, _ = imported('window')
  ids, got, want = greedy_pair(model, base / 'fm', 'hello world', 64)
  assert len(ids) + 64 > 4 * WINDOW and len(want) == 64 and got == want


def test_llama_shapes_export_as_llama_unless_family_phi3(imported, tmp_path, capsys):
  from fmjax.convert.cli import main as convert_main
  plain = tiny_config().model
  assert families.pick_family(plain) is llama and families.pick_family(plain, 'phi3') is phi3
  windowed = tiny_config(sliding_window=4).model
  assert families.pick_family(windowed) is llama and llama.to_hf_config(windowed)['model_type'] == 'mistral'
  assert phi3.mismatch(windowed) is None and phi3.to_hf_config(windowed)['sliding_window'] == 4
  assert 'model.attention_bias=True' in phi3.mismatch(tiny_config(attention_bias=True).model)
  assert families.pick_family(tiny_config(attention_bias=True).model) is qwen2
  scaled = tiny_config(rope_scaling='linear', rope_factor=2.0).model
  assert "model.rope_scaling='linear'" in phi3.mismatch(scaled)
  with pytest.raises(ConversionError, match='--family phi3 contradicts .*rope_scaling'):
    families.pick_family(scaled, 'phi3')
  # An imported Phi-3 is Llama-shaped: by default it exports as Llama, with --family phi3 as Phi-3.
  _, base, out = imported('full')
  tokens = verify.sample_tokens(out['model'].vocab_size, T)
  fm = verify.fmjax_logits(out['params'], out['model'], tokens)
  assert convert_main(['to-hf', '--workdir', str(base / 'fm'), '--out', str(tmp_path / 'llama')]) == 0
  assert convert_main(['to-hf', '--workdir', str(base / 'fm'), '--out', str(tmp_path / 'phi3'), '--family', 'phi3']) == 0
  capsys.readouterr()
  for name, cls in (('llama', transformers.LlamaForCausalLM), ('phi3', transformers.Phi3ForCausalLM)):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name), use_safetensors=True)
    hf.eval()
    assert type(hf) is cls and np.abs(fm - hf_logits(hf, tokens)).max() < 1e-5
  assert 'model.layers.0.mlp.gate_up_proj.weight' in dict(hf.named_parameters())


BASE_HF = dict(model_type='phi3', hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
               vocab_size=264, intermediate_size=64, max_position_embeddings=4096, sliding_window=2047)


def test_config_translation_and_what_fmjax_lacks_is_refused_in_one_line():
  opts = phi3.from_hf_config(BASE_HF)   # Phi-3-mini's window: below the context, so every layer slides
  assert (opts['sliding_window'], opts['norm_eps'], opts['tie_embeddings'], opts['rope_theta']) == \
      (2047, 1e-5, False, 10000.0)     # transformers' Phi3Config defaults for the omitted keys
  assert 'sliding_window' not in phi3.from_hf_config(dict(BASE_HF, sliding_window=4096))   # the whole context
  assert 'sliding_window' not in phi3.from_hf_config(dict(BASE_HF, sliding_window=None))
  v5 = phi3.from_hf_config(dict(BASE_HF, rope_scaling=None, rope_parameters=dict(
      rope_type='default', rope_theta=1e6, partial_rotary_factor=1.0)))
  assert v5['rope_theta'] == 1e6 and v5['rope_scaling'] == 'none'
  assert families.family_for('phi3') is phi3
  assert families.model_type_of({'architectures': ['Phi3ForCausalLM']}) == 'phi3'
  factors = dict(short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=4096)
  for kind in ('longrope', 'su', 'yarn', 'dynamic'):
    _one_line(lambda: phi3.from_hf_config(dict(BASE_HF, rope_scaling=dict(type=kind, **factors))),
              f'rope_scaling.type={kind!r}')
    _one_line(lambda: phi3.from_hf_config(dict(BASE_HF, rope_parameters=dict(rope_type=kind, rope_theta=1e4,
                                                                              **factors))),
              f'rope_parameters.rope_type={kind!r}')
  _one_line(lambda: phi3.from_hf_config(dict(BASE_HF, partial_rotary_factor=0.5)), 'partial_rotary_factor=0.5')
  _one_line(lambda: phi3.from_hf_config(dict(BASE_HF, rope_parameters=dict(rope_theta=1e4, partial_rotary_factor=0.75))),
            'rope_parameters.partial_rotary_factor=0.75')
  _one_line(lambda: phi3.from_hf_config(dict(BASE_HF, hidden_act='gelu_new')), "hidden_act='gelu_new'")
  for key in ('attention_bias', 'mlp_bias'):
    _one_line(lambda: phi3.from_hf_config(dict(BASE_HF, **{key: True})), f'{key}=True')
  _one_line(lambda: phi3.from_hf_config(dict(BASE_HF, sliding_window=0)), 'sliding_window=0')


def test_the_command_line_refuses_longrope_in_one_line(imported, tmp_path, capsys):
  from fmjax.convert.cli import main as convert_main
  _, base, _ = imported('window')
  shutil.copytree(base / 'hf', tmp_path / 'long')
  with open(tmp_path / 'long' / 'config.json') as f:
    cfg = json.load(f)
  cfg['rope_parameters'] = dict(rope_type='longrope', rope_theta=500.0, short_factor=[1.0] * 4,
                                long_factor=[2.0] * 4, original_max_position_embeddings=64)
  with open(tmp_path / 'long' / 'config.json', 'w') as f:
    json.dump(cfg, f)
  assert convert_main(['from-hf', '--hf-dir', str(tmp_path / 'long'), '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "rope_parameters.rope_type='longrope'" in err, err
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('name', ['window', 'full'])
def test_from_hf_verify_passes_against_float64(imported, name, tmp_path, capsys):
  _, base, _ = imported(name)
  print(verify_import(base / 'hf', tmp_path / 'v', capsys, WINDOW if name == 'window' else 0))
