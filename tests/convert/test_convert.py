"""Checkpoint conversion: HF <-> fmjax logits agree, exact round trips, params-only, clear errors."""

import os
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip('safetensors')
from safetensors.numpy import load_file, save_file  # noqa: E402

from fmjax.checkpoints import store as checkpoint  # noqa: E402
from fmjax.model import layout  # noqa: E402
from fmjax.convert import ConversionError, driver, source, verify  # noqa: E402
from fmjax.convert.cli import main as cli_main  # noqa: E402
from helpers import assert_same_tree, tiny_config  # noqa: E402

LLAMA = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=32,
             rope_theta=500.0, norm_eps=1e-6)
GPT2 = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=0, mlp_dim=64, max_seq_len=32,
            activation='gelu', norm='layernorm', positions='learned', use_bias=True, tie_embeddings=True)


def _hf_model(kind, path):
  """A seeded tiny transformers model with every weight perturbed (norms and biases too), saved as safetensors."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  if kind == 'llama':
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                                   max_position_embeddings=32, tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(cfg)
  elif kind == 'mistral':  # same layout as Llama when there is no sliding window
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, rope_theta=2000.0,
                                     max_position_embeddings=32, sliding_window=None)
    model = transformers.MistralForCausalLM(cfg)
  else:
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
                                  eos_token_id=2)
    model = transformers.GPT2LMHeadModel(cfg)
  from hf_models import save_perturbed
  return save_perturbed(model, path)


def _hf_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _fmjax_workdir(tmp_path, overrides, scan_layers=True, seed=1, tokenizer=None):
  """A params-only fmjax checkpoint of a random model (norms and biases perturbed), as a workdir."""
  cfg = tiny_config(**overrides, scan_layers=scan_layers)
  rng = np.random.default_rng(seed)  # NumPy values on the model's shapes: nothing to compile
  params = jax.tree.map(lambda a: (1.0 if a.ndim == 1 else 0.0) + 0.1 * rng.standard_normal(a.shape, np.float32),
                        source.abstract_params(cfg.model))
  workdir = str(tmp_path / f'fm_{seed}_{int(scan_layers)}')
  if tokenizer:  # as fmjax.train places it: copied into the workdir, recorded by name
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(tokenizer, os.path.join(workdir, 'tokenizer.model'))
  driver.save_params(workdir, 3, params, checkpoint.make_metadata(cfg, 'tokenizer.model' if tokenizer else 'byte'))
  return workdir, params, cfg.model


@pytest.mark.parametrize('kind,scan', [('llama', True), ('gpt2', False), ('mistral', True)])
def test_import_from_hf_matches_logits(tmp_path, kind, scan):
  model = _hf_model(kind, tmp_path / 'hf')
  out = driver.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'fm'), scan_layers=scan)
  tokens = verify.sample_tokens(96, 32)
  diff = np.abs(verify.fmjax_logits(out['params'], out['model'], tokens) - _hf_logits(model, tokens)).max()
  print(f'{kind} HF -> fmjax: max abs logits diff {diff:.3g}, {out["seconds"]:.2f}s')
  assert diff < 1e-4
  # The written checkpoint restores through fmjax's Checkpointer and metadata alone.
  src = source.open_source(str(tmp_path / 'fm'))
  assert src.step == 0 and src.model.scan_layers == scan and src.meta['params_only']
  assert_same_tree(source.restore_params(src), out['params'])


@pytest.mark.parametrize('overrides,scan', [(LLAMA, True), (LLAMA, False), (GPT2, True)])
def test_export_to_hf_and_back(tmp_path, overrides, scan):
  transformers = pytest.importorskip('transformers')
  workdir, params, model_cfg = _fmjax_workdir(tmp_path, overrides, scan)
  src = source.open_source(workdir)
  out = driver.to_hf(src, str(tmp_path / 'hf'), max_shard_bytes=20_000)
  assert os.path.isfile(tmp_path / 'hf' / 'model.safetensors.index.json')  # split into shards
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'), use_safetensors=True)
  hf.eval()
  assert type(hf).__name__ == out['family'].ARCHITECTURE
  tokens = verify.sample_tokens(96, 32)
  diff = np.abs(verify.fmjax_logits(params, model_cfg, tokens) - _hf_logits(hf, tokens)).max()
  print(f'{out["family"].NAME} fmjax -> HF: max abs logits diff {diff:.3g}, {out["seconds"]:.2f}s')
  assert diff < 1e-4
  back = driver.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'back'), scan_layers=scan)
  assert_same_tree(back['params'], params)


def test_export_bf16_verifies_through_cli(tmp_path, capsys):
  pytest.importorskip('transformers')
  workdir, _, _ = _fmjax_workdir(tmp_path, LLAMA)
  assert cli_main(['to-hf', '--workdir', workdir, '--out', str(tmp_path / 'hf'), '--dtype', 'bfloat16', '--verify']) == 0
  assert 'verify: max abs logits diff' in capsys.readouterr().out
  assert load_file(str(tmp_path / 'hf' / 'model.safetensors'))['lm_head.weight'].dtype.name == 'bfloat16'


def test_sentencepiece_tokenizer_exports_for_transformers(tmp_path):
  transformers = pytest.importorskip('transformers')
  from fmjax.data import tokenizers
  texts = ['def foo(x):\n    return x + 1  # hi\n', 'The quick brown fox. ' * 3, 'naïve café 日本語 😀'] * 20
  model_file = tokenizers.train_sentencepiece(iter(texts), 320, output=str(tmp_path / 'sp.model'))
  workdir, _, _ = _fmjax_workdir(tmp_path, dict(LLAMA, vocab_size=320), tokenizer=model_file)
  driver.to_hf(source.open_source(workdir), str(tmp_path / 'hf'))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  fm_tok = tokenizers.load_tokenizer(model_file)
  for text in ['  def foo(x):\n\treturn  x', 'Hello world  café 😀', ' leading space']:
    ids = hf_tok(text)['input_ids']
    assert ids == [fm_tok.bos_id] + fm_tok.encode(text).tolist()
    assert hf_tok.decode(ids, skip_special_tokens=True) == text
  # Imported back, the workdir's tokenizer is the same SentencePiece model.
  driver.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'back'))
  assert source.open_source(str(tmp_path / 'back')).tokenizer == str(tmp_path / 'back' / 'tokenizer.model')
  with open(tmp_path / 'back' / 'tokenizer.model', 'rb') as a, open(model_file, 'rb') as b:
    assert a.read() == b.read()


def _rewrite(path, edit):
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={'format': 'pt'})


def test_missing_or_misshapen_tensor_is_named(tmp_path):
  workdir, _, _ = _fmjax_workdir(tmp_path, LLAMA)
  hf_dir = str(tmp_path / 'hf')
  driver.to_hf(source.open_source(workdir), hf_dir)
  weights = os.path.join(hf_dir, 'model.safetensors')
  _rewrite(weights, lambda t: t.__setitem__('model.layers.1.self_attn.k_proj.weight', np.zeros((8, 32), np.float32)))
  with pytest.raises(ConversionError, match=r'model\.layers\.1\.self_attn\.k_proj\.weight has shape \[8, 32\]'):
    driver.from_hf(hf_dir, str(tmp_path / 'a'))
  _rewrite(weights, lambda t: t.pop('model.layers.1.self_attn.k_proj.weight'))
  with pytest.raises(ConversionError, match=r'tensor model\.layers\.1\.self_attn\.k_proj\.weight is missing'):
    driver.from_hf(hf_dir, str(tmp_path / 'b'))
  _rewrite(weights, lambda t: t.__setitem__('model.layers.0.self_attn.q_proj.bias', np.zeros(32, np.float32)))
  with pytest.raises(ConversionError, match='k_proj.weight is missing'):  # missing is reported first
    driver.from_hf(hf_dir, str(tmp_path / 'c'))
  os.remove(weights)
  open(os.path.join(hf_dir, 'pytorch_model.bin'), 'wb').close()
  with pytest.raises(ConversionError, match='pytorch_model.bin are pickles and are never read'):
    driver.from_hf(hf_dir, str(tmp_path / 'd'))


def test_unsupported_hf_configs_are_named():
  from fmjax.convert.families import gpt2
  from fmjax.convert.families import llama
  base = dict(model_type='mistral', hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=96,
              intermediate_size=64, hidden_act='silu', max_position_embeddings=4096)
  with pytest.raises(ConversionError, match="sliding_window='1024' must be a positive integer"):
    llama.from_hf_config(dict(base, sliding_window='1024'))
  with pytest.raises(ConversionError, match="rope scaling 'llama3' needs rope_parameters.factor"):
    llama.from_hf_config(dict(base, rope_parameters=dict(rope_type='llama3', rope_theta=5e5)))
  with pytest.raises(ConversionError, match="rope scaling 'yarn' is not supported"):
    llama.from_hf_config(dict(base, rope_parameters=dict(rope_type='yarn', rope_theta=5e5, factor=4.0)))
  with pytest.raises(ConversionError, match='activation_function=.relu.'):
    gpt2.from_hf_config(dict(n_embd=32, n_head=4, n_layer=2, vocab_size=96, n_positions=32,
                             activation_function='relu'))
  with pytest.raises(ConversionError, match="model_type='falcon'"):
    driver.family_for({'model_type': 'falcon'})
  with pytest.raises(ConversionError, match="model_type=None"):
    driver.family_for({'architectures': ['FalconForCausalLM']})
  assert driver.family_for({'architectures': ['MistralForCausalLM']}) is llama


def test_flags_contradicting_metadata_are_errors(tmp_path, capsys):
  workdir, _, _ = _fmjax_workdir(tmp_path, LLAMA, scan_layers=True)
  with pytest.raises(ConversionError, match=r"--source-layout='unrolled' contradicts .*\('scanned'\)"):
    source.open_source(workdir, scanned=False)
  with pytest.raises(ConversionError, match="--tokenizer=.*contradicts"):
    source.open_source(workdir, tokenizer=str(tmp_path / 'other.model'))
  with pytest.raises(ConversionError, match='--family gpt2 contradicts .*model.norm'):
    driver.pick_family(source.open_source(workdir).model, 'gpt2')
  assert cli_main(['to-hf', '--workdir', workdir, '--step', '7', '--out', str(tmp_path / 'x')]) == 2
  assert 'has no step 7' in capsys.readouterr().err


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A real training checkpoint (params + Adam moments + data state) made on a (2, 2, 2) mesh."""
  from fmjax import train
  root = tmp_path_factory.mktemp('train')
  (root / 'corpus').mkdir()
  for i in range(6):
    (root / 'corpus' / f'{i}.txt').write_text(f'document {i}: ' + 'the quick brown fox jumps. ' * (20 + i))
  cfg = tiny_config(vocab_size=260, d_model=64, mlp_dim=128)  # 260: the byte vocab, divisible by tensor=2
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.data.update(source='text', files=str(root / 'corpus' / '*.txt'), cache_dir=str(root / 'cache'),
                  validation_fraction=0.0)
  cfg.update(steps=1, checkpoint_every=0, async_checkpoints=False, log_every=1, cpu_peak_flops=1e9,
             workdir=str(root / 'run'))
  train.train(cfg)
  return cfg


def _disk_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_training_checkpoint_to_params_only(trained, tmp_path):
  src = source.open_source(trained.workdir)
  assert src.step == 1 and src.model.scan_layers and src.tokenizer == 'byte'
  reference = source.restore_params(src, source.mesh_of('2,2,2'))  # as trained, fp32, sharded

  bf16 = driver.params_only(src, str(tmp_path / 'bf16'), dtype='bfloat16')
  dst = source.open_source(str(tmp_path / 'bf16'))  # metadata alone describes it
  assert dst.meta['params_only'] and dst.model.param_dtype == 'bfloat16' and dst.tokenizer == 'byte'
  restored = source.restore_params(dst)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))  # on one device
  assert_same_tree(restored, jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), reference))

  fp32 = driver.params_only(src, str(tmp_path / 'fp32'), scan_layers=False, mesh_spec='1,2,1')
  unrolled = source.restore_params(source.open_source(str(tmp_path / 'fp32')))
  assert_same_tree(unrolled, layout.scanned_to_unrolled(jax.device_get(reference), trained.model.num_layers))

  train_size = _disk_bytes(os.path.join(trained.workdir, 'checkpoints', '1'))
  ratios = {k: _disk_bytes(out['path']) / train_size for k, out in (('bf16', bf16), ('fp32', fp32))}
  print(f'params-only / training checkpoint size: {ratios}; bf16 in {bf16["seconds"]:.2f}s')
  assert 0.25 < ratios['fp32'] < 0.42    # params without the two Adam moments: about a third
  assert 0.10 < ratios['bf16'] < 0.25    # and half of that again in bf16


def test_verify_limits_are_tight_and_dtype_aware(tmp_path):
  """On a well-conditioned model the floor (1e-4) is the limit, ~100x above fmjax's float32 error vs the float64
  reference (a 1e-3 error in one weight fails; the old 1e-2 default let it pass); bf16 params are checked against
  a bf16-rounded reference."""
  _hf_model('llama', tmp_path / 'hf')
  hf_dir = str(tmp_path / 'hf')
  fp32 = driver.from_hf(hf_dir, str(tmp_path / 'fm32'))
  exact = verify.verify(fp32['params'], fp32['model'], hf_dir, log=lambda _: None)
  assert exact['max_abs_diff'] < verify.MAX_ABS_DIFF['float32'] / 10 and exact['kl'] < verify.MAX_KL['float32']
  # transformers' own float32 noise here is ~1e-6 (measured 8.3e-7; fmjax 9.1e-7): the floor decides.
  assert 0 < exact['reference_noise'] < verify.MAX_ABS_DIFF['float32'] / verify.NOISE_FACTOR
  assert exact['limit'] == verify.MAX_ABS_DIFF['float32'] and exact['kl_limit'] == verify.MAX_KL['float32']
  assert exact['tokens'] == (2, 32) and exact['dtype'] == 'float32'
  # bf16 weights: the reference is rounded the same way, so the same tight limit holds ...
  bf16 = driver.from_hf(hf_dir, str(tmp_path / 'fm16'), dtype='bfloat16')
  assert verify.params_dtype(bf16['params']) == 'bfloat16'
  rounded = verify.verify(bf16['params'], bf16['model'], hf_dir, log=lambda _: None)
  assert rounded['max_abs_diff'] < verify.MAX_ABS_DIFF['bfloat16']
  # ... where comparing with the unrounded fp32 reference would be off by a bf16-sized amount.
  tokens = verify.sample_tokens(96, 32)
  unrounded = verify.compare(verify.fmjax_logits(bf16['params'], bf16['model'], tokens),
                             verify.hf_logits(hf_dir, tokens, 'float32'))
  assert unrounded['max_abs_diff'] > 10 * verify.MAX_ABS_DIFF['bfloat16'], unrounded
  # A small real error (one norm scale off by 1e-3) fails, with the limit and the factor in one line.
  bad = jax.tree.map(lambda x: x, fp32['params'])
  bad['final_norm']['scale'] = bad['final_norm']['scale'] + 1e-3
  with pytest.raises(ConversionError) as e:
    verify.verify(bad, fp32['model'], hf_dir, log=lambda _: None)
  msg = str(e.value)
  assert 'max abs logits diff' in msg and 'exceeds the float32 limit 0.0001 (' in msg and '\n' not in msg, msg
  diff = verify.compare(verify.fmjax_logits(bad, fp32['model'], tokens), verify.hf_logits(hf_dir, tokens))
  assert 1e-4 < diff['max_abs_diff'] < 1e-2, diff                # what the old default could not see


def _peaked_llama(path):
  """The reported case: a tiny Llama whose logits reach ~43 (q/k projections x6: attention scores of a few
  hundred; lm_head x20), where float32 rounding alone moves logits by a few 1e-4."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                                 max_position_embeddings=32, tie_word_embeddings=False, rms_norm_eps=1e-6)
  model = transformers.LlamaForCausalLM(cfg).eval()
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():   # every weight perturbed (norms too), then the scaling
      p.add_(0.1 * torch.randn_like(p))
    for layer in model.model.layers:
      layer.self_attn.q_proj.weight.mul_(6.0)
      layer.self_attn.k_proj.weight.mul_(6.0)
    model.lm_head.weight.mul_(20.0)
  model.save_pretrained(path, safe_serialization=True)
  return model


def test_verify_limit_follows_the_reference_noise(tmp_path, capsys):
  """--verify compares with transformers in float64 and allows NOISE_FACTOR x transformers' own float32 error.
  Measured on this peaked model (2x32 tokens, logits up to 43): fmjax vs float64 1.0e-4, transformers float32
  vs float64 2.9e-4 (the noise), fmjax vs transformers float32 3e-4 -- the old fixed 1e-4 limit against
  float32 refused this correct import, and even against float64 the fixed 1e-4 would be at the edge. Limit:
  max(1e-4, 8 x 2.9e-4) = 2.3e-3. bf16 weights: 1.1e-4 vs noise 2.2e-4. Across the tests' models (Llama,
  Llama 3, Mistral with a window, Qwen2/3, GPT-2, these peaked ones; fp32 and bf16) fmjax's error is
  0.4-1.5x transformers'; without widening transformers' float32 steps (norms, softmax, RoPE) its float64 run
  would itself be ~0.5x the noise off."""
  hf_dir = str(tmp_path / 'hf')
  model = _peaked_llama(hf_dir)
  assert cli_main(['from-hf', '--hf-dir', hf_dir, '--out', str(tmp_path / 'fm'), '--verify']) == 0
  line = [s for s in capsys.readouterr().out.splitlines() if s.startswith('verify:')]
  assert len(line) == 1 and 'transformers float64' in line[0] and 'limit' in line[0], line
  out = driver.from_hf(hf_dir, str(tmp_path / 'fm_again'), log=lambda _: None)
  result = verify.verify(out['params'], out['model'], hf_dir, log=lambda _: None)
  # (c) the limit is relative to the reference's noise, and that noise is far above the well-conditioned ~1e-6.
  noise = result['reference_noise']
  assert noise > 3e-5 and result['reference_noise_kl'] > 0, result
  assert result['limit'] == max(verify.MAX_ABS_DIFF['float32'], verify.NOISE_FACTOR * noise) > 1e-3
  assert result['kl_limit'] == max(verify.MAX_KL['float32'], verify.NOISE_FACTOR * result['reference_noise_kl'])
  assert result['max_abs_diff'] < 2 * noise, result            # fmjax's fp32 error: the order of transformers'
  tokens = verify.sample_tokens(96, 32)
  old = np.abs(verify.fmjax_logits(out['params'], out['model'], tokens) - _hf_logits(model, tokens)).max()
  assert old > verify.MAX_ABS_DIFF['float32'] / 2, old           # the old comparison: failing or near
  bf16 = driver.from_hf(hf_dir, str(tmp_path / 'fm16'), dtype='bfloat16', log=lambda _: None)
  assert verify.verify(bf16['params'], bf16['model'], hf_dir, log=lambda _: None)['reference_noise'] > 3e-5
  # (b) wrong conversions still fail, in one line: a norm scale off by 1e-3, two query heads swapped.
  scale = jax.tree.map(lambda x: x, out['params'])
  scale['final_norm']['scale'] = scale['final_norm']['scale'] + 1e-3
  swapped = jax.tree.map(lambda x: x, out['params'])
  q = np.array(swapped['layers']['attn']['q']['kernel'])        # (layers, d_model, heads, head_dim)
  q[1, :, [0, 1]] = q[1, :, [1, 0]]
  swapped['layers']['attn']['q']['kernel'] = q
  for bad in (scale, swapped):
    with pytest.raises(ConversionError) as e:
      verify.verify(bad, out['model'], hf_dir, log=lambda _: None)
    msg = str(e.value)
    assert 'max abs logits diff' in msg and 'exceeds the float32 limit' in msg and '\n' not in msg, msg
  # An explicit --max-diff is an absolute limit, whatever the noise.
  with pytest.raises(ConversionError, match='exceeds the float32 limit 1e-05'):
    verify.verify(out['params'], out['model'], hf_dir, max_abs=1e-5, log=lambda _: None)


def test_verify_runs_past_the_sliding_window():
  model = lambda **kw: tiny_config(**{**LLAMA, 'max_seq_len': 128, **kw}).model
  assert verify.verify_length(model()) == 32                     # no window: 2x32 tokens as before
  assert verify.verify_length(model(sliding_window=8)) == 32
  assert verify.verify_length(model(sliding_window=16)) == 64    # 4 windows
  assert verify.verify_length(model(sliding_window=100)) == 128  # at most the context
  assert verify.verify_length(model(max_seq_len=16)) == 16


def test_verify_failure_names_each_limit():
  assert verify.failures({'max_abs_diff': 3e-3, 'kl': 5e-7}, 1e-4, 1e-6, 'float32') == [
      'max abs logits diff 0.003 exceeds the float32 limit 0.0001 (30x)']
  assert verify.failures({'max_abs_diff': 1e-5, 'kl': 2e-5}, 1e-4, 1e-6, 'bfloat16') == [
      'mean KL 2e-05 exceeds the bfloat16 limit 1e-06 (20x)']
  assert len(verify.failures({'max_abs_diff': float('nan'), 'kl': 0.0}, 1e-4, 1e-6, 'float32')) == 1
  from fmjax.convert.cli import build_parser
  args = build_parser().parse_args(['to-hf', '--workdir', 'w', '--out', 'o', '--verify'])
  assert args.max_diff is None and args.max_kl is None          # dtype-aware defaults from verify


def test_a_quantized_run_exports_its_unquantized_weights(tmp_path):
  """model.quantization changes the matmuls, never the stored weights: to-hf writes the fp32 parameters
  (bit for bit), and transformers' float model matches fmjax's unquantized logits."""
  transformers = pytest.importorskip('transformers')
  workdir, params, model_cfg = _fmjax_workdir(tmp_path, {**LLAMA, 'quantization': 'int8'})
  assert model_cfg.quantization == 'int8'
  assert cli_main(['to-hf', '--workdir', workdir, '--out', str(tmp_path / 'hf'), '--verify']) == 0
  tensors = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  assert {t.dtype.name for t in tensors.values()} == {'float32'}
  np.testing.assert_array_equal(tensors['model.embed_tokens.weight'], np.asarray(params['embedding']))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'), use_safetensors=True).eval()
  tokens = verify.sample_tokens(96, 32)
  float_cfg = model_cfg.copy_and_resolve_references()
  float_cfg.quantization = 'none'
  diff = np.abs(verify.fmjax_logits(params, float_cfg, tokens) - _hf_logits(hf, tokens)).max()
  assert diff < 1e-4
