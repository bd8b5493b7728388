"""Mistral with a sliding window (window 8, sequences 4x as long) converts both ways: logits agree with
transformers under every CPU attention implementation, greedy decoding past the window matches, the export
is MistralForCausalLM with its window, and the window itself is what makes the match (off, it does not)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from fmjax.config import base_config  # noqa: E402
from fmjax.config.errors import ConfigError  # noqa: E402
from fmjax.config import checks  # noqa: E402
from fmjax.convert import driver, source, verify  # noqa: E402
from fmjax.convert.families import llama  # noqa: E402
from fmjax.model import attention_spec  # noqa: E402
from helpers import assert_same_tree  # noqa: E402
from hf_models import greedy_pair, save_perturbed, verify_import  # noqa: E402

WINDOW, T = 8, 32


@pytest.fixture(scope='module')
def mistral(tmp_path_factory):
  """(transformers model, base directory, from-hf result) of a perturbed tiny MistralForCausalLM."""
  base = tmp_path_factory.mktemp('mistral')
  torch.manual_seed(0)
  config = transformers.MistralConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128, sliding_window=WINDOW, rope_theta=500.0,
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  model = save_perturbed(transformers.MistralForCausalLM(config), base / 'hf')
  model.config._attn_implementation = 'eager'
  out = driver.from_hf(str(base / 'hf'), str(base / 'fm'), tokenizer='byte', log=lambda s: None)
  return model, base, out


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize('attention', ['xla', 'dense', 'chunked'])
def test_windowed_logits_match_transformers(mistral, attention):
  model, _, out = mistral
  m = out['model']
  assert m.sliding_window == WINDOW and attention_spec.score_spec(m).sliding_window == WINDOW
  tokens = verify.sample_tokens(m.vocab_size, T)
  want = _hf_logits(model, tokens)
  windowed = m.copy_and_resolve_references()
  windowed.update(dict(attention=attention, attention_chunk=4))   # chunks of 4: blocks outside the window skip
  diff = np.abs(verify.fmjax_logits(out['params'], windowed, tokens, attention=attention) - want).max()
  print(f'mistral, window {WINDOW}, {T} tokens, attention={attention}: max abs diff {diff:.3g}')
  assert diff < 1e-4, diff
  full = windowed.copy_and_resolve_references()
  full.sliding_window = 0
  without = verify.fmjax_logits(out['params'], full, tokens, attention=attention)
  assert np.abs(without - want).max() > 1e-2   # the window matters


def test_from_hf_verify_passes_against_float64_past_the_window(mistral, tmp_path, capsys):
  _, base, _ = mistral
  print(verify_import(base / 'hf', tmp_path / 'v', capsys, WINDOW))


def test_greedy_decoding_past_the_window_matches_transformers(mistral):
  model, base, _ = mistral
  ids, got, want = greedy_pair(model, base / 'fm', 'the quick brown', 64)
  assert len(ids) + 64 > 4 * WINDOW and got == want


def test_export_is_mistral_with_its_window_and_round_trips(mistral):
  model, base, out = mistral
  driver.to_hf(source.open_source(str(base / 'fm')), str(base / 'export'), log=lambda s: None)
  with open(base / 'export' / 'config.json') as f:
    exported = json.load(f)
  assert (exported['model_type'], exported['sliding_window'], exported['architectures']) == \
      ('mistral', WINDOW, ['MistralForCausalLM'])
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base / 'export'), use_safetensors=True)
  hf.eval()
  assert type(hf) is transformers.MistralForCausalLM
  tokens = verify.sample_tokens(out['model'].vocab_size, T)
  assert np.abs(_hf_logits(hf, tokens) - verify.fmjax_logits(out['params'], out['model'], tokens)).max() < 1e-5
  back = driver.from_hf(str(base / 'export'), str(base / 'back'), log=lambda s: None)
  assert back['model'].sliding_window == WINDOW
  assert_same_tree(back['params'], out['params'])


def test_window_options_and_bad_values():
  hf = dict(model_type='mistral', hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=96,
            intermediate_size=64, hidden_act='silu', max_position_embeddings=64)
  assert llama.from_hf_config(dict(hf, sliding_window=16))['sliding_window'] == 16
  assert 'sliding_window' not in llama.from_hf_config(dict(hf, sliding_window=None))
  assert 'sliding_window' not in llama.from_hf_config(dict(hf, sliding_window=64))     # the whole context
  assert 'sliding_window' not in llama.from_hf_config(dict(hf, model_type='llama', sliding_window=16))
  with pytest.raises(Exception, match='sliding_window=0 must be a positive integer'):
    llama.from_hf_config(dict(hf, sliding_window=0))
  cfg = base_config()
  cfg.model.sliding_window = -1
  with pytest.raises(ConfigError, match='model.sliding_window must be an integer >= 0'):
    checks.validate(cfg)
  cfg.model.update(dict(sliding_window=4, kind='encoder', positions='learned'))
  with pytest.raises(ConfigError, match='model.sliding_window=4 is for causal decoders'):
    checks.validate(cfg)
  assert 'model.sliding_window=4' in llama.mismatch(cfg.model, qk_norm=False, window=False)
