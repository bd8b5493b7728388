"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm before RoPE, free head_dim) convert both ways: logits
agree with transformers, exports load as the same class, round trips are bitwise, greedy decoding matches,
and what fmjax lacks (sliding windows, other RoPE scalings, inconsistent tying) is refused in one line."""

import json
import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')

from fmjax.convert import driver, families, source, verify  # noqa: E402
from fmjax.convert.families import llama, qwen2, qwen3  # noqa: E402
from helpers import assert_same_tree, tiny_config  # noqa: E402
from hf_models import greedy_pair, one_line as _one_line, save_perturbed  # noqa: E402

# rope_theta=500 over 32 positions: RoPE rotates q and k a lot, so q/k norms after RoPE would not match.
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0, rms_norm_eps=1e-6,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {   # name -> (config class, model class, options): GQA everywhere, tied and untied heads
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(vocab_size=96,
                                                                             tie_word_embeddings=False)),
    'qwen2_tied': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(vocab_size=96,
                                                                                  tie_word_embeddings=True)),
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(vocab_size=96, head_dim=16,
                                                                             tie_word_embeddings=False)),
    'qwen3_tied': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(vocab_size=300, head_dim=16,
                                                                                  tie_word_embeddings=True)),
}


def hf_model(name, path):
  """A seeded tiny transformers Qwen model, every weight (norms and biases too) perturbed by 0.1 * randn, saved."""
  config_cls, model_cls, options = CASES[name]
  torch.manual_seed(0)
  return save_perturbed(model_cls(config_cls(**COMMON, **options)), path)


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """name -> (transformers model, its directory, the from-hf result), each made once."""
  made = {}

  def get(name):
    if name not in made:
      base = tmp_path_factory.mktemp(name)
      model = hf_model(name, base / 'hf')
      out = driver.from_hf(str(base / 'hf'), str(base / 'fm'), tokenizer='byte', log=lambda s: None)
      made[name] = (model, base, out)
    return made[name]
  return get


@pytest.mark.parametrize('name', list(CASES))
def test_import_export_and_round_trip(imported, name):
  model, base, out = imported(name)
  m = out['model']
  assert out['family'].NAME == name.split('_')[0]
  assert m.attention_bias == name.startswith('qwen2') and m.qk_norm == name.startswith('qwen3')
  assert m.tie_embeddings == name.endswith('_tied') and m.num_kv_heads == 2
  if name.startswith('qwen3'):
    assert m.head_dim == 16 and m.d_model // m.num_heads == 8
  tokens = verify.sample_tokens(m.vocab_size, 32)
  fm = verify.fmjax_logits(out['params'], m, tokens)
  diff_import = np.abs(fm - hf_logits(model, tokens)).max()
  assert diff_import < 1e-4, diff_import

  exported = driver.to_hf(source.open_source(str(base / 'fm')), str(base / 'export'), log=lambda s: None)
  with open(base / 'export' / 'config.json') as f:
    assert json.load(f)['model_type'] == name.split('_')[0]
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(base / 'export'), use_safetensors=True)
  hf.eval()
  assert type(hf) is type(model) and exported['family'].ARCHITECTURE == type(model).__name__
  diff_export = np.abs(fm - hf_logits(hf, tokens)).max()
  print(f'{name}: fmjax vs transformers {diff_import:.3g} (import), {diff_export:.3g} (export)')
  assert diff_export < 1e-5, diff_export
  back = driver.from_hf(str(base / 'export'), str(base / 'back'), log=lambda s: None)
  assert_same_tree(back['params'], out['params'])


def test_greedy_decoding_matches_transformers(imported):
  model, base, _ = imported('qwen3_tied')
  _, got, want = greedy_pair(model, base / 'fm', 'the quick brown', 16)
  assert len(want) == 16 and got == want


BASE_HF = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=96, intermediate_size=64,
               hidden_act='silu', max_position_embeddings=4096)


@pytest.mark.parametrize('fam', [qwen2, qwen3])
def test_what_fmjax_lacks_is_refused_in_one_line(fam):
  base = dict(BASE_HF, model_type=fam.NAME, head_dim=8)
  _one_line(lambda: fam.from_hf_config(dict(base, use_sliding_window=True, sliding_window=1024,
                                            max_window_layers=0)),
            'use_sliding_window=true', 'sliding_window=1024')
  _one_line(lambda: fam.from_hf_config(dict(base, use_sliding_window=True, sliding_window=1024,
                                            layer_types=['full_attention', 'sliding_attention'])),
            'use_sliding_window=true', 'layers 1..1')
  # A window no layer uses (max_window_layers covers them all, or layer_types, which transformers follows, says
  # full attention) or one as long as the context is no window.
  assert fam.from_hf_config(dict(base, use_sliding_window=True, sliding_window=1024, max_window_layers=2))
  assert fam.from_hf_config(dict(base, use_sliding_window=True, sliding_window=1024, max_window_layers=0,
                                 layer_types=['full_attention'] * 2))
  assert fam.from_hf_config(dict(base, use_sliding_window=True, sliding_window=4096, max_window_layers=0))
  assert fam.from_hf_config(dict(base, use_sliding_window=False, sliding_window=1024, max_window_layers=0))
  for kind in ('yarn', 'dynamic'):
    _one_line(lambda: fam.from_hf_config(dict(base, rope_parameters=dict(rope_type=kind, rope_theta=1e6,
                                                                          factor=4.0))), f'rope_type={kind!r}')
    _one_line(lambda: fam.from_hf_config(dict(base, rope_scaling=dict(type=kind, factor=4.0))), f'rope_type={kind!r}')
  linear = fam.from_hf_config(dict(base, rope_parameters=dict(rope_type='linear', rope_theta=1e6, factor=2.0)))
  assert (linear['rope_scaling'], linear['rope_factor'], linear['rope_theta']) == ('linear', 2.0, 1e6)
  _one_line(lambda: fam.from_hf_config(dict(base, hidden_act='gelu')), "hidden_act='gelu'")
  if fam is qwen3:   # a Qwen3 attention_bias also biases o: not fmjax's attention_bias
    _one_line(lambda: fam.from_hf_config(dict(base, attention_bias=True)), 'attention_bias=True')
    assert fam.from_hf_config(dict(BASE_HF))['head_dim'] == 128   # transformers' Qwen3 default
  assert families.family_for(fam.NAME) is fam


def _edit_config(path, **changes):
  with open(path / 'config.json') as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path / 'config.json', 'w') as f:
    json.dump(cfg, f)


def test_tying_inconsistent_with_the_tensors_is_refused(imported, tmp_path):
  import shutil
  _, base, _ = imported('qwen2')
  shutil.copytree(base / 'hf', tmp_path / 'said_tied')
  _edit_config(tmp_path / 'said_tied', tie_word_embeddings=True)   # lm_head.weight differs from the embedding
  _one_line(lambda: driver.from_hf(str(tmp_path / 'said_tied'), str(tmp_path / 'a')), 'tie_word_embeddings=true',
            'lm_head.weight')
  _, base, _ = imported('qwen2_tied')
  shutil.copytree(base / 'hf', tmp_path / 'said_untied')
  _edit_config(tmp_path / 'said_untied', tie_word_embeddings=False)  # no lm_head.weight in the file
  _one_line(lambda: driver.from_hf(str(tmp_path / 'said_untied'), str(tmp_path / 'b')), 'lm_head.weight',
            'missing')
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


def _leaves(model_cfg):
  params = source.abstract_params(model_cfg)
  return {'/'.join(k.key for k in p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_the_fields_add_exactly_their_parameters():
  off = tiny_config(scan_layers=False).model
  leaves = _leaves(off)
  attn = sorted(k.split('/', 2)[2] for k in leaves if k.startswith('layers_0/attn/'))
  assert attn == ['k/kernel', 'o/kernel', 'q/kernel', 'v/kernel']       # the defaults: no new parameters
  assert not any(k.endswith('/bias') or '/q_norm/' in k or '/k_norm/' in k for k in leaves)
  biased = _leaves(tiny_config(scan_layers=False, attention_bias=True).model)
  assert sorted(set(biased) - set(leaves)) == [f'layers_{i}/attn/{n}/bias' for i in range(2) for n in 'kqv']
  assert biased['layers_0/attn/q/bias'] == (4, 8) and biased['layers_0/attn/k/bias'] == (2, 8)
  normed = _leaves(tiny_config(scan_layers=False, qk_norm=True).model)
  assert {k: v for k, v in normed.items() if k not in leaves} == \
      {f'layers_{i}/attn/{n}_norm/scale': (8,) for i in range(2) for n in 'qk'}
  # Exports are told apart: a plain model is Llama, the biased one Qwen2, the normed one Qwen3.
  assert families.pick_family(off) is llama
  assert families.pick_family(tiny_config(attention_bias=True).model) is qwen2
  assert families.pick_family(tiny_config(qk_norm=True).model) is qwen3
  assert 'model.attention_bias=True' in llama.mismatch(tiny_config(attention_bias=True).model)


def _reference_attention(p, x, cfg, norm_after_rope=False):
  """NumPy self-attention of one layer: q/k/v projections (+ biases), q/k RMSNorm per head, RoPE (half
  split), causal GQA softmax, o projection."""
  h, kv, t = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, x.shape[0]
  hd = cfg.head_dim or cfg.d_model // h
  proj = lambda n: np.einsum('td,dhe->the', x, p[n]['kernel']) + p[n].get('bias', 0.0)
  q, k, v = proj('q'), proj('k'), proj('v')
  rms = lambda a, w: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + cfg.norm_eps) * w
  angles = np.arange(t)[:, None] * cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)[None]
  cos, sin = (np.concatenate([f(angles)] * 2, -1)[:, None] for f in (np.cos, np.sin))
  rope = lambda a: a * cos + np.concatenate([-a[..., hd // 2:], a[..., :hd // 2]], -1) * sin
  norm = (lambda a, n: rms(a, p[n]['scale'])) if cfg.qk_norm else (lambda a, n: a)
  if norm_after_rope:
    q, k = norm(rope(q), 'q_norm'), norm(rope(k), 'k_norm')
  else:
    q, k = rope(norm(q, 'q_norm')), rope(norm(k, 'k_norm'))
  k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
  scores = np.einsum('the,she->hts', q, k) / np.sqrt(hd) + np.where(np.tri(t) > 0, 0.0, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('hts,she,hed->td', probs, v, p['o']['kernel'])


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_one_attention_layer_matches_a_numpy_reference(kv_heads):
  """q/k/v biases in the fused (MHA: one matmul for q, k, v) and unfused (GQA: q, then k and v) paths, and
  q/k norms before RoPE: the same layer with the norms after RoPE is far off."""
  from fmjax.model.attention import Attention
  cfg = tiny_config(attention_bias=True, qk_norm=True, num_kv_heads=kv_heads, head_dim=16, rope_theta=100.0,
                    norm_eps=1e-6, attention='xla').model
  rng = np.random.default_rng(kv_heads)
  x = rng.standard_normal((1, 12, cfg.d_model)).astype(np.float32)
  positions, segments = jnp.arange(12)[None], jnp.ones((1, 12), jnp.int32)
  abstract = jax.eval_shape(lambda: Attention(cfg).init(jax.random.PRNGKey(0), x, positions, segments))['params']
  params = jax.tree.map(lambda a: (1.0 if a.ndim == 1 else 0.0) + 0.3 * rng.standard_normal(a.shape, np.float32),
                        nn.unbox(abstract))   # norm scales near 1, kernels and (H, D) biases near 0
  got = np.asarray(jax.jit(Attention(cfg).apply)({'params': params}, x, positions, segments))[0]
  np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _reference_attention(np_params, x[0].astype(np.float64), cfg)
  after = _reference_attention(np_params, x[0].astype(np.float64), cfg, norm_after_rope=True)
  print(f'kv_heads={kv_heads}: max diff {np.abs(got - want).max():.3g} '
        f'(norms after RoPE: {np.abs(got - after).max():.3g})')
  assert np.abs(got - want).max() < 1e-4 and np.abs(got - after).max() > 1e-2


def test_the_command_line_imports_with_verify_and_refuses_in_one_line(imported, tmp_path, capsys):
  import shutil
  from fmjax.convert.cli import main as convert_main
  _, base, _ = imported('qwen2')
  assert convert_main(['from-hf', '--hf-dir', str(base / 'hf'), '--out', str(tmp_path / 'ok'), '--verify']) == 0
  assert 'verify: max abs logits diff' in capsys.readouterr().out
  # layer_types null (files from before transformers wrote it): the layers from max_window_layers on slide.
  edits = {'window': (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
                      ('use_sliding_window=true', 'sliding_window=8', 'layers 1..1')),
           'yarn': (dict(rope_parameters=dict(rope_type='yarn', rope_theta=500.0, factor=4.0)), ("rope_type='yarn'",))}
  for name, (changes, words) in edits.items():
    shutil.copytree(base / 'hf', tmp_path / name)
    _edit_config(tmp_path / name, **changes)
    assert convert_main(['from-hf', '--hf-dir', str(tmp_path / name), '--out', str(tmp_path / f'out_{name}')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('fmjax-convert: error:') and all(w in err for w in words), err
    assert not os.path.exists(tmp_path / f'out_{name}')
