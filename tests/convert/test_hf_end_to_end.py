"""Start from a Hugging Face model: from-hf -> finetune -> generate -> to-hf, with the model's own config,
tokenizer and context, checked against transformers and AutoTokenizer (tiny models and tokenizers made here)."""

import csv
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
hf_tokenizers = pytest.importorskip('tokenizers')

from fmjax import generate as generate_command  # noqa: E402
from fmjax.inference import generate as generate_lib  # noqa: E402
from fmjax.checkpoints import restore  # noqa: E402
from fmjax.convert import verify  # noqa: E402
from fmjax.convert.cli import main as convert_main  # noqa: E402
from fmjax.finetune import main as finetune_main  # noqa: E402
from hf_models import WORDS, GPT2_EOS, _perturb, corpus, make_llama3, train_bpe  # noqa: E402



def make_gpt2(path):
  """GPT-2: learned positions (256), biases, layernorm, its vocab.json + merges.txt tokenizer only."""
  tok = train_bpe([GPT2_EOS])
  os.makedirs(path)
  tok.model.save(str(path))                     # vocab.json + merges.txt, as GPT-2 ships them
  eos = tok.token_to_id(GPT2_EOS)
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                bos_token_id=eos, eos_token_id=eos)
  model = _perturb(transformers.GPT2LMHeadModel(cfg), 0.2)
  model.save_pretrained(path, safe_serialization=True)
  return model


MAKERS = {'llama3': make_llama3, 'gpt2': make_gpt2}


def write_csv(path, n, seed):
  rng = np.random.default_rng(seed)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(('text', 'label'))
    for i in range(n):
      label = ('fox', 'dog')[i % 2]
      w.writerow((' '.join(rng.choice(WORDS, size=5)) + f' {label} ' * 3, label))
  return str(path)


def finetune_argv(init_from, workdir, tmp):
  """A classification fine-tune with no model flags: the checkpoint gives the model."""
  return ['--config', 'default', f'--config.init_from={init_from}', '--workdir', str(workdir),
          '--config.finetune.task=classify', '--config.finetune.source=csv',
          f'--config.finetune.train_files={write_csv(tmp / "train.csv", 16, 0)}',
          f'--config.finetune.eval_files={write_csv(tmp / "eval.csv", 8, 1)}',
          '--config.steps=2', '--config.finetune.epochs=0', '--config.finetune.baseline=false',
          '--config.seq_len=32', '--config.global_batch_size=8', '--config.eval_every=2',
          '--config.log_every=1', '--config.checkpoint_every=0', '--config.async_checkpoints=false',
          '--config.progress_bar=false', '--config.cpu_peak_flops=1e9', '--config.optim.warmup_steps=1']


def hf_greedy(model, ids, new):
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new, do_sample=False, pad_token_id=model.config.eos_token_id)
  return out[0, len(ids):].tolist()


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['llama3', 'gpt2'])
def test_import_finetune_generate_export(kind, tmp_path, capsys):
  hf_dir, fm = tmp_path / 'hf', tmp_path / 'fm'
  model = MAKERS[kind](hf_dir)
  assert convert_main(['from-hf', '--hf-dir', str(hf_dir), '--out', str(fm)]) == 0

  # The checkpoint records the model's own config, tokenizer and context.
  restored = restore.restore(str(fm))
  m = restored.cfg.model
  assert restored.context_length == 256 and m.max_seq_len == 256
  if kind == 'llama3':
    assert (m.rope_theta, m.norm_eps, m.rope_scaling, m.rope_factor, m.rope_original_max_len) == \
        (5e5, 1e-6, 'llama3', 8.0, 64)
    assert m.tie_embeddings and m.num_kv_heads == 2
  auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))   # the original files: an independent reference
  texts = ['the quick brown fox', 'café naïve\n    x = 1', '  two  spaces, then ' + GPT2_EOS + ' text']
  for text in texts:
    assert restored.tokenizer.encode(text).tolist() == auto(text, add_special_tokens=False)['input_ids']
    assert restored.tokenizer.decode(restored.tokenizer.encode(text)) == text

  # Fine-tuning takes the whole model from the checkpoint (no shape flags).
  assert finetune_main(finetune_argv(str(fm), tmp_path / 'ft', tmp_path)) == 0
  with open(tmp_path / 'ft' / 'config.json') as f:
    ft_model = json.load(f)['model']
  assert {k: ft_model[k] for k in restored.meta['model'] if k not in restore.MUTABLE_MODEL_KEYS} == \
      {k: v for k, v in restored.meta['model'].items() if k not in restore.MUTABLE_MODEL_KEYS}

  # Greedy decoding equals transformers' greedy, 3 prompts x 40 tokens, past 128 tokens of context.
  prompts = [' '.join(corpus(12, seed)).replace('\n', ' ')[:520 + 40 * seed] for seed in (0, 1, 2)]
  gen = generate_lib.generate(restored, prompts, max_new_tokens=40)
  for ids, out in zip(gen.prompt_tokens, gen.tokens):
    assert len(out) == 40 and len(ids) + len(out) > 128, (len(ids), len(out))
    assert out == hf_greedy(model, ids, 40)
  print(f'{kind}: prompts of {[len(p) for p in gen.prompt_tokens]} tokens; greedy of the first: {gen.tokens[0]}')

  # Export: transformers reads the same model and AutoTokenizer gives fmjax's ids.
  out_dir = tmp_path / 'export'
  assert convert_main(['to-hf', '--workdir', str(fm), '--out', str(out_dir)]) == 0
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), use_safetensors=True)
  exported.eval()
  tokens = verify.sample_tokens(m.vocab_size, 256, batch=1, length=200)   # past the original 64 and 128
  fm_logits = verify.fmjax_logits(restored.params, m, tokens)
  diff_export = np.abs(fm_logits - hf_logits(exported, tokens)).max()
  diff_orig = np.abs(fm_logits - hf_logits(model, tokens)).max()
  print(f'{kind}: fmjax vs exported {diff_export:.3g}, vs original {diff_orig:.3g}')
  assert diff_export < 1e-4 and diff_orig < 1e-4
  auto_out = transformers.AutoTokenizer.from_pretrained(str(out_dir))
  lm_encode = lambda t: ([restored.tokenizer.bos_id] if restored.cfg.data.add_bos else []) + \
      restored.tokenizer.encode(t).tolist()
  for text in texts:
    assert auto_out(text)['input_ids'] == lm_encode(text) == auto(text)['input_ids']
  if kind == 'llama3':
    with open(out_dir / 'config.json') as f:
      rope = json.load(f)['rope_parameters']
    assert rope['rope_type'] == 'llama3' and rope['factor'] == 8.0


@pytest.fixture(scope='module')
def imported_llama3(tmp_path_factory):
  root = tmp_path_factory.mktemp('llama3')
  make_llama3(root / 'hf')
  assert convert_main(['from-hf', '--hf-dir', str(root / 'hf'), '--out', str(root / 'fm')]) == 0
  return root


def test_finetune_override_contradicting_checkpoint_is_refused(imported_llama3, tmp_path, capsys):
  argv = finetune_argv(str(imported_llama3 / 'fm'), tmp_path / 'ft', tmp_path) + ['--config.model.rope_theta=10000']
  assert finetune_main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'rope_theta=10000.0' in err and 'rope_theta=500000.0' in err, err
  assert not os.path.exists(tmp_path / 'ft' / 'config.json')   # refused before anything was written


def test_llama3_rope_logits_match_transformers_past_original_context(imported_llama3):
  model = transformers.AutoModelForCausalLM.from_pretrained(str(imported_llama3 / 'hf'), use_safetensors=True)
  model.eval()
  restored = restore.restore(str(imported_llama3 / 'fm'))
  tokens = verify.sample_tokens(restored.cfg.model.vocab_size, 256, batch=2, length=160)
  diff = np.abs(verify.fmjax_logits(restored.params, restored.cfg.model, tokens) - hf_logits(model, tokens))
  assert diff.max() < 1e-4, diff.max()
  # Without the scaling the model is another function past the original context (the test can fail).
  plain = restored.cfg.model.copy_and_resolve_references()
  plain.rope_scaling = 'none'
  assert np.abs(verify.fmjax_logits(restored.params, plain, tokens) - hf_logits(model, tokens)).max() > 1e-2


def test_generate_cli_runs_an_imported_tokenizer_json_model(imported_llama3, capsys):
  assert generate_command.main(['--workdir', str(imported_llama3 / 'fm'), '--prompt', 'the quick brown',
                            '--max-new-tokens', '4']) == 0
  out = capsys.readouterr().out
  assert "--- [1] 'the quick brown'" in out and 'decode: ' in out


def test_linear_rope_scaling_imports_and_exports(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                 rope_parameters=dict(rope_type='linear', rope_theta=1e4, factor=4.0))
  model = _perturb(transformers.LlamaForCausalLM(cfg), 0.2)
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  assert convert_main(['from-hf', '--hf-dir', str(tmp_path / 'hf'), '--out', str(tmp_path / 'fm'),
                       '--tokenizer', 'byte', '--verify']) == 0
  restored = restore.restore(str(tmp_path / 'fm'))
  assert (restored.cfg.model.rope_scaling, restored.cfg.model.rope_factor) == ('linear', 4.0)
  tokens = verify.sample_tokens(300, 128, batch=1, length=100)
  diff = np.abs(verify.fmjax_logits(restored.params, restored.cfg.model, tokens) - hf_logits(model, tokens)).max()
  assert diff < 1e-4
  assert convert_main(['to-hf', '--workdir', str(tmp_path / 'fm'), '--out', str(tmp_path / 'back'), '--verify']) == 0
  with open(tmp_path / 'back' / 'config.json') as f:
    assert json.load(f)['rope_parameters'] == dict(rope_type='linear', rope_theta=1e4, factor=4.0)
