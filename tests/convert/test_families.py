"""Model families are registered (fmjax/convert/families): looked up by HF model_type and by name,
listed in one-line errors and in fmjax-convert --help."""

import types

import pytest

from fmjax import cli
from fmjax.convert import ConversionError, families
from fmjax.convert.cli import build_parser
from fmjax.convert.families import bert, gemma, gpt2, llama, mixtral, olmo2, olmoe, phi3, qwen2, qwen3, qwen3_moe


def test_every_family_module_registers_its_model_types():
  assert set(families.registered()) == {bert.BERT, bert.ROBERTA, gemma.Gemma2, gemma.Gemma3, gpt2, llama, mixtral,
                                       olmo2, olmoe, phi3, qwen2, qwen3, qwen3_moe}
  assert sorted(families.model_types()) == ['bert', 'gemma2', 'gemma3_text', 'gpt2', 'llama', 'mistral', 'mixtral',
                                            'olmo2', 'olmoe', 'phi3', 'qwen2', 'qwen3', 'qwen3_moe', 'roberta']
  for model_type, fam in [('llama', llama), ('mistral', llama), ('gpt2', gpt2), ('bert', bert.BERT),
                          ('roberta', bert.ROBERTA), ('qwen2', qwen2), ('qwen3', qwen3), ('gemma2', gemma.Gemma2),
                          ('gemma3_text', gemma.Gemma3), ('olmo2', olmo2), ('phi3', phi3), ('mixtral', mixtral),
                          ('qwen3_moe', qwen3_moe), ('olmoe', olmoe)]:
    assert families.family_for(model_type) is fam
    assert families.by_name(fam.NAME) is fam
  assert families.model_type_of({'architectures': ['RobertaForMaskedLM']}) == 'roberta'
  assert families.model_type_of({'model_type': 'gpt2', 'architectures': ['LlamaForCausalLM']}) == 'gpt2'
  assert families.model_type_of({'architectures': ['Qwen3MoeForCausalLM']}) == 'qwen3_moe'
  assert families.model_type_of({'architectures': ['Qwen3ForCausalLM']}) == 'qwen3'


def test_an_unknown_model_type_is_one_line_naming_the_registered_ones():
  with pytest.raises(ConversionError) as err:
    families.family_for('opt')
  message = str(err.value)
  assert '\n' not in message and "model_type='opt'" in message
  assert all(t in message for t in families.model_types())
  with pytest.raises(ConversionError, match="--family 'opt': expected one of bert, roberta, gemma2, gemma3, gpt2, "
                                            "llama, mixtral, olmo2, olmoe, phi3, qwen2, qwen3, qwen3_moe$"):
    families.by_name('opt')


def test_registering_checks_the_interface_and_clashes():
  with pytest.raises(TypeError, match='lacks TITLES, IGNORED'):
    families.register(types.SimpleNamespace(NAME='half', ARCHITECTURE='X', MODEL_TYPES=('half',)))
  clash = types.SimpleNamespace(**{k: getattr(llama, k) for k in (
      'ARCHITECTURE', 'IGNORED', 'OPTIONAL_PREFIX', 'mismatch', 'to_hf_config', 'from_hf_config', 'rules')},
      NAME='other', MODEL_TYPES=('mistral',), TITLES=('Other',))
  with pytest.raises(ValueError, match="model_type 'mistral' is already read by 'llama'"):
    families.register(clash)
  with pytest.raises(ValueError, match="'llama' is registered twice"):
    families.register(types.SimpleNamespace(**{**vars(clash), 'NAME': 'llama', 'MODEL_TYPES': ('x',)}))
  assert families.register(llama) is llama                                # registering again is harmless
  assert 'other' not in families.names()


def test_help_lists_every_registered_family(capsys):
  parser = build_parser()
  with pytest.raises(SystemExit):
    parser.parse_args(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  for title in ('BERT', 'RoBERTa', 'GPT-2', 'Llama', 'Mistral', 'Qwen2', 'Qwen3', 'Gemma 2', 'Gemma 3', 'OLMo 2',
                'Phi-3', 'Mixtral', 'Qwen3-MoE', 'OLMoE',
                'BertForMaskedLM', 'RobertaForMaskedLM'):
    assert title in text, title
  assert parser.parse_args(['to-hf', '--workdir', 'w', '--out', 'o', '--family', 'roberta']).family == 'roberta'
  with pytest.raises(cli.UsageError, match="--family: invalid choice: 'opt' .*'bert', 'roberta', 'gemma2', 'gemma3', "
                                           "'gpt2', 'llama', 'mixtral', 'olmo2', 'olmoe', 'phi3'"):
    parser.parse_args(['to-hf', '--workdir', 'w', '--out', 'o', '--family', 'opt'])
