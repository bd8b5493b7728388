"""Mixtral, Qwen3-MoE and OLMoE convert both ways: tiny random transformers models (4 experts, top-2, every
weight perturbed so experts, router columns and norms all differ) give fmjax's logits, the router, the expert
order and gate / up each bite, --verify passes against float64, greedy decoding equals transformers', exports
hold the per-expert tensors transformers writes, load as the same class with the same logits and round-trip
bitwise, what fmjax lacks is refused in one line, and an MoE model never exports as a dense family."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from fmjax.config import base_config  # noqa: E402
from fmjax.convert import driver, families, hf_io, source, verify  # noqa: E402
from fmjax.convert.families import mixtral, moe_experts, olmoe, qwen3_moe  # noqa: E402
from fmjax.convert.mapping import Rule, expand, identity, locate  # noqa: E402
from fmjax.model import moe  # noqa: E402
from fmjax.model.transformer import Transformer  # noqa: E402
from helpers import assert_same_tree  # noqa: E402
from hf_models import greedy_pair, imported_models, one_line, verify_import  # noqa: E402

T = 24
COMMON = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-6,
              num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {
    'mixtral': (transformers.MixtralForCausalLM, transformers.MixtralConfig,
                dict(num_local_experts=4, sliding_window=8)),
    'qwen3_moe': (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
                  dict(num_experts=4, moe_intermediate_size=64, norm_topk_prob=True, head_dim=16)),
    # layer 0 dense (intermediate_size), layers 1 and 2 MoE with narrower experts, raw top-k weights
    'qwen3_moe_mixed': (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
                        dict(num_experts=4, moe_intermediate_size=24, norm_topk_prob=False, mlp_only_layers=[0],
                             num_hidden_layers=3, tie_word_embeddings=True)),
    'olmoe': (transformers.OlmoeForCausalLM, transformers.OlmoeConfig, dict(num_experts=4, norm_topk_prob=False)),
}
FAMILY = {'mixtral': mixtral, 'qwen3_moe': qwen3_moe, 'qwen3_moe_mixed': qwen3_moe, 'olmoe': olmoe}


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """name -> (transformers model, its directory, the from-hf result), each made once."""
  def build(name):
    cls, config, options = CASES[name]
    return cls(config(**dict(COMMON, **options)))
  return imported_models(tmp_path_factory, build)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _apply(model_cfg):
  """A jitted fp32 forward of `model_cfg` (one compile for every params tree of the same shapes)."""
  cfg = model_cfg.copy_and_resolve_references()
  cfg.update(dtype='float32', param_dtype='float32', attention='xla', remat='none')
  apply = jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))
  return lambda params, tokens: np.asarray(apply(params, jnp.asarray(tokens)))


def _moe_params(params, m, layer):
  """The `moe` subtree of MoE layer `layer` and a function putting a changed one back (scanned or unrolled)."""
  if m.scan_layers:
    def put(new):
      return dict(params, layers=dict(params['layers'], moe=new))
    return params['layers']['moe'], put
  key = f'layers_{layer}'
  return params[key]['moe'], lambda new: dict(params, **{key: dict(params[key], moe=new)})


@pytest.mark.parametrize('name', list(CASES))
def test_import_matches_transformers_and_each_expert_mapping_bites(imported, name):
  model, _, out = imported(name)
  m, params = out['model'], out['params']
  assert out['family'] is FAMILY[name] and m.num_experts == 4 and m.num_experts_per_tok == 2
  assert m.moe_router_z_loss == 0.0 and m.moe_aux_loss == model.config.router_aux_loss_coef
  layers = moe.moe_layers(m)
  assert layers == ([1, 2] if name == 'qwen3_moe_mixed' else [0, 1]) and m.scan_layers == (name != 'qwen3_moe_mixed')
  f = {'qwen3_moe_mixed': 24}.get(name, 64)
  experts, put = _moe_params(params, m, layers[-1])
  lead = (2,) if m.scan_layers else ()
  assert experts['router'].shape == lead + (32, 4) and experts['wi_0'].shape == lead + (4, 32, f)
  assert experts['wo'].shape == lead + (4, f, 32)
  if name == 'qwen3_moe_mixed':
    assert params['layers_0']['mlp']['wi_0']['kernel'].shape == (32, 64) and 'moe' not in params['layers_0']
  tokens = verify.sample_tokens(m.vocab_size, T, length=T)
  want = _hf_logits(model, tokens)
  logits = _apply(m)
  diff = np.abs(logits(params, tokens) - want).max()
  print(f'{name}: fmjax vs transformers float32 max abs diff {diff:.3g}')
  assert diff < 1e-4, diff
  # the router's expert columns, the expert order and gate / up each matter: a mapping that mixed them up
  # would be caught (the perturbed experts all differ)
  roll = lambda x: jnp.roll(x, 1, axis=len(lead))
  for what, new in (('router columns rolled', dict(experts, router=jnp.roll(experts['router'], 1, axis=-1))),
                    ('experts rolled', dict(experts, **{k: roll(experts[k]) for k in ('wi_0', 'wi_1', 'wo')})),
                    ('gate and up swapped', dict(experts, wi_0=experts['wi_1'], wi_1=experts['wi_0']))):
    off = np.abs(logits(put(new), tokens) - want).max()
    print(f'{name}: {what}: max abs diff {off:.3g}')
    assert off > 1e-2, what


@pytest.mark.parametrize('name', ['mixtral', 'qwen3_moe_mixed', 'olmoe'])
def test_from_hf_verify_passes_against_float64(imported, tmp_path, capsys, name):
  _, base, out = imported(name)
  print(verify_import(base / 'hf', tmp_path / 'v', capsys, out['model'].sliding_window))


# OLMoE's decoding in the slow suite (7 s): its q/k norm over the whole projection decodes as OLMo 2's
# (tests/convert/test_olmo2.py) and its raw top-k weights as qwen3_moe_mixed's
@pytest.mark.parametrize('name', ['mixtral', 'qwen3_moe_mixed', pytest.param('olmoe', marks=pytest.mark.slow)])
def test_greedy_decoding_matches_transformers(imported, name):
  model, base, _ = imported(name)
  _, got, want = greedy_pair(model, base / 'fm', 'the quick', 64)
  assert len(want) == 64 and got == want


@pytest.mark.parametrize('name', list(CASES))
def test_export_is_what_transformers_writes_loads_and_round_trips(imported, name):
  model, base, out = imported(name)
  exported = driver.to_hf(source.open_source(str(base / 'fm')), str(base / 'export'), log=lambda s: None)
  assert exported['family'] is FAMILY[name] and families.pick_family(out['model']) is FAMILY[name]
  with open(base / 'export' / 'config.json') as f:
    assert json.load(f)['model_type'] == model.config.model_type
  written = hf_io.SafetensorsReader(str(base / 'export')).names()
  assert written == hf_io.SafetensorsReader(str(base / 'hf')).names()   # save_pretrained's per-expert tensors
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base / 'export'), use_safetensors=True).eval()
  assert type(hf) is type(model)
  assert (hf.config.num_local_experts if name == 'mixtral' else hf.config.num_experts) == 4
  tokens = verify.sample_tokens(out['model'].vocab_size, T, length=T)
  diff = np.abs(_hf_logits(hf, tokens) - _hf_logits(model, tokens)).max()
  print(f'{name}: export: transformers vs the original max abs diff {diff:.3g}')
  assert diff < 1e-5, diff
  back = driver.from_hf(str(base / 'export'), str(base / 'back'), log=lambda s: None)
  assert back['model'].scan_layers == out['model'].scan_layers
  assert_same_tree(back['params'], out['params'])


def test_what_fmjax_lacks_is_refused_in_one_line(imported, tmp_path):
  mix = dict(COMMON, model_type='mixtral', num_local_experts=4)
  one_line(lambda: mixtral.from_hf_config(dict(mix, router_jitter_noise=0.1)), 'router_jitter_noise=0.1')
  one_line(lambda: mixtral.from_hf_config(dict(mix, num_experts_per_tok=5)), 'num_experts_per_tok=5')
  one_line(lambda: mixtral.from_hf_config(dict(mix, scoring_func='sigmoid')), "scoring_func='sigmoid'")
  qwen = dict(COMMON, model_type='qwen3_moe', num_experts=4, moe_intermediate_size=24)
  one_line(lambda: qwen3_moe.from_hf_config(dict(qwen, mlp_only_layers=[1])), 'mlp_only_layers=[1]')
  one_line(lambda: qwen3_moe.from_hf_config(dict(qwen, n_group=2, topk_group=1)), 'n_group=2', 'grouped top-k')
  one_line(lambda: qwen3_moe.from_hf_config(dict(qwen, shared_expert_intermediate_size=16)),
           'shared_expert_intermediate_size=16', 'shared experts')
  one_line(lambda: qwen3_moe.from_hf_config(dict(qwen, num_local_experts=8)), 'num_local_experts=8', 'num_experts=4')
  one_line(lambda: qwen3_moe.from_hf_config(dict(qwen, use_sliding_window=True, sliding_window=8)),
           'use_sliding_window')
  one_line(lambda: qwen3_moe.from_hf_config(dict(qwen, mlp_only_layers=[0, 1])), 'no layer is sparse')
  ol = dict(COMMON, model_type='olmoe', num_experts=4)
  one_line(lambda: olmoe.from_hf_config(dict(ol, clip_qkv=8.0)), 'clip_qkv=8.0')
  one_line(lambda: olmoe.from_hf_config(dict(ol, rope_parameters=dict(rope_type='linear', factor=2.0))),
           "rope_parameters.rope_type='linear'")
  one_line(lambda: families.family_for('deepseek_v3'), "model_type='deepseek_v3'", 'grouped top-k')
  one_line(lambda: families.family_for('qwen2_moe'), "model_type='qwen2_moe'", 'shared expert')
  _, base, _ = imported('qwen3_moe_mixed')
  one_line(lambda: driver.from_hf(str(base / 'hf'), str(tmp_path / 'scanned'), scan_layers=True, log=lambda s: None),
           '--layout scanned', 'layers 0 are dense', '--layout unrolled')


def test_an_moe_model_exports_as_no_dense_family_and_a_dense_one_as_no_moe_family():
  moe_families = (mixtral, qwen3_moe, olmoe)
  for fam, hf in ((mixtral, dict(COMMON, num_local_experts=4)), (qwen3_moe, dict(COMMON, num_experts=4)),
                  (olmoe, dict(COMMON, num_experts=4))):
    m = base_config().model
    m.update(fam.from_hf_config(dict(hf, model_type=fam.MODEL_TYPES[0])))
    assert fam.mismatch(m) is None and families.pick_family(m) is fam
    for other in families.registered():
      if other not in moe_families:
        assert 'model.num_experts=4' in other.mismatch(m), other.NAME
    for feature, words in ((dict(num_experts=0), 'model.num_experts=0'),
                           (dict(moe_shared_mlp_dim=16), 'model.moe_shared_mlp_dim'),
                           (dict(embed_scale=True), 'a Gemma feature')):
      changed = m.copy_and_resolve_references()
      changed.update(feature)
      assert words in (fam.mismatch(changed) or ''), (fam.NAME, feature)
  m = base_config().model
  m.update(mixtral.from_hf_config(dict(COMMON, num_local_experts=4)), moe_renormalize=False)
  assert 'model.moe_renormalize=False' in mixtral.mismatch(m)
  m.update(moe_every=2)
  assert 'model.moe_every=2' in mixtral.mismatch(m) and 'model.moe_every' in olmoe.mismatch(m)
  # every layer MoE: mlp_dim is unused, the file's intermediate_size is the experts' width (configs/moe_default.py)
  m.update(moe_every=1, moe_renormalize=True, moe_mlp_dim=16)
  assert mixtral.mismatch(m) is None and mixtral.to_hf_config(m)['intermediate_size'] == 16


def test_expert_rules_expand_to_one_hf_tensor_per_expert_slice():
  rule = Rule('l.{i}.e.{j}.w', ('layers_{i}/moe/wi_0',), layers=(1, 2), experts=3, **identity((2,)))
  table = expand([rule, Rule('norm', ('final_norm/scale',), **identity((2,)))], num_layers=4)
  assert [(e.name, e.layer, e.expert) for e in table] == (
      [(f'l.{i}.e.{j}.w', i, j) for i in (1, 2) for j in range(3)] + [('norm', None, None)])
  assert locate('layers_{i}/moe/wi_0', 2, False, 1) == (['layers_2', 'moe', 'wi_0'], (1,))
  assert locate('layers_{i}/moe/wi_0', 2, True, 1) == (['layers', 'moe', 'wi_0'], (2, 1))
  assert locate('layers_{i}/attn/q/kernel', 2, True) == (['layers', 'attn', 'q', 'kernel'], (2,))
  assert locate('final_norm/scale', None, True) == (['final_norm', 'scale'], ())
  m = base_config().model
  for first, every in ((0, 1), (1, 1), (0, 2), (2, 3)):
    m.update(num_layers=7, num_experts=4, moe_first_dense=first, moe_every=every)
    assert list(moe_experts.moe_layer_indices(7, first, every)) == moe.moe_layers(m)


def test_coverage_counts_every_layer_and_expert_slice():
  tree = {'layers': {'moe': {'wi_0': np.zeros((2, 3, 1, 1))}}}
  rule = lambda **kw: Rule('l.{i}.e.{j}.w', ('layers_{i}/moe/wi_0',), **identity((1, 1)), **kw)
  driver._check_coverage(expand([rule(experts=3)], 2), tree, scanned=True)
  one_line(lambda: driver._check_coverage(expand([rule(experts=2)], 2), tree, scanned=True),
           'layers/moe/wi_0', 'maps 4 of its 6')
  one_line(lambda: driver._check_coverage(expand([rule(experts=3, layers=(1,))], 2), tree, scanned=True),
           'maps 3 of its 6')
