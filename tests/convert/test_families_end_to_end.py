"""An imported Qwen3, Qwen3-MoE and Gemma 3 (tiny transformers models with their own tokenizer.json, made
here) through every command a user starts with: train --init-from for 20 steps, a classification
fine-tune with no shape flags, evaluate, generate (greedy equals transformers past Gemma's window), and
AutoTokenizer ids equal fmjax's (Qwen without a BOS, Gemma with one)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
hf_tokenizers = pytest.importorskip('tokenizers')

from fmjax import evaluate as evaluate_command  # noqa: E402
from fmjax import train  # noqa: E402
from fmjax.checkpoints import restore  # noqa: E402
from fmjax.convert.cli import main as convert_main  # noqa: E402
from fmjax.finetune import main as finetune_main  # noqa: E402
from fmjax.inference import generate as generate_lib  # noqa: E402
from hf_models import _perturb, corpus, train_bpe  # noqa: E402
from test_hf_end_to_end import finetune_argv, hf_greedy  # noqa: E402

pytestmark = pytest.mark.slow

SPECIALS = {'qwen3': ('<|endoftext|>', '<|im_start|>', '<|im_end|>'), 'gemma3': ('<pad>', '<bos>', '<eos>')}
SPECIALS['qwen3_moe'] = SPECIALS['qwen3']


def _tokenizer(kind, path):
  tok = train_bpe(SPECIALS[kind])
  config = dict(tokenizer_class='PreTrainedTokenizerFast', model_max_length=256)
  if kind == 'gemma3':   # Gemma puts <bos> before a text; Qwen puts nothing
    tok.post_processor = hf_tokenizers.processors.TemplateProcessing(
        single='<bos> $A', special_tokens=[('<bos>', tok.token_to_id('<bos>'))])
    config.update(bos_token='<bos>', eos_token='<eos>', pad_token='<pad>')
  else:
    config.update(bos_token=None, eos_token='<|endoftext|>', pad_token='<|endoftext|>')
  os.makedirs(path)
  tok.save(os.path.join(path, 'tokenizer.json'))
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  return tok


def make(kind, path):
  tok = _tokenizer(kind, path)
  ids = {s: tok.token_to_id(s) for s in SPECIALS[kind]}
  torch.manual_seed(0)
  common = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True)
  qwen = dict(num_hidden_layers=2, head_dim=16, rope_theta=1e4, bos_token_id=None,
              eos_token_id=ids.get('<|endoftext|>'), pad_token_id=ids.get('<|endoftext|>'))
  if kind == 'qwen3':
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, **qwen))
  elif kind == 'qwen3_moe':   # 4 experts of width 32, 2 per token, renormalised
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **common, **qwen, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True))
  else:
    cfg = transformers.Gemma3TextConfig(
        **common, num_hidden_layers=7, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
        layer_types=['sliding_attention'] * 5 + ['full_attention', 'sliding_attention'],
        rope_parameters={'full_attention': dict(rope_type='default', rope_theta=1e4),
                         'sliding_attention': dict(rope_type='default', rope_theta=100.0)},
        bos_token_id=ids['<bos>'], eos_token_id=ids['<eos>'], pad_token_id=ids['<pad>'])
    model = transformers.Gemma3ForCausalLM(cfg)
  model = _perturb(model, 0.1)
  model.config._attn_implementation = 'eager'
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.mark.parametrize('kind', ['qwen3', 'qwen3_moe', 'gemma3'])
def test_imported_family_trains_finetunes_evaluates_and_generates(kind, tmp_path, capsys):
  hf_dir, fm = tmp_path / 'hf', tmp_path / 'fm'
  model = make(kind, hf_dir)
  assert convert_main(['from-hf', '--hf-dir', str(hf_dir), '--out', str(fm), '--verify']) == 0
  restored = restore.restore(str(fm))
  assert restored.cfg.data.add_bos == (kind == 'gemma3')
  auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  for text in ('the quick brown fox', 'café naïve\n    x = 1'):
    ids = ([restored.tokenizer.bos_id] if restored.cfg.data.add_bos else []) + restored.tokenizer.encode(text).tolist()
    assert ids == auto(text)['input_ids']

  # Continued pretraining, 20 steps, from the imported parameters (no model flags).
  (tmp_path / 'corpus').mkdir()
  for i, text in enumerate(corpus(40, seed=3)):
    (tmp_path / 'corpus' / f'{i}.txt').write_text(text * 3)
  run = tmp_path / 'run'
  assert train.main(['--config', 'default', '--workdir', str(run), '--init-from', str(fm),
                     '--config.data.source=text', f'--config.data.files={tmp_path / "corpus" / "*.txt"}',
                     f'--config.data.cache_dir={tmp_path / "cache"}', '--config.data.validation_fraction=0.2',
                     '--config.steps=20', '--config.seq_len=64', '--config.global_batch_size=8',
                     '--config.optim.warmup_steps=2', '--config.log_every=1', '--config.eval_every=0',
                     '--config.checkpoint_every=0', '--config.async_checkpoints=false', '--config.progress_bar=false',
                     '--config.cpu_peak_flops=1e9']) == 0
  with open(run / 'metrics.jsonl') as f:
    losses = [r['loss'] for r in map(json.loads, f) if r['split'] == 'train']
  assert len(losses) == 20 and all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  capsys.readouterr()
  assert evaluate_command.main(['--workdir', str(run), '--batches', '2']) == 0
  assert 'loss' in capsys.readouterr().out

  # A classification fine-tune takes the whole model from the checkpoint.
  assert finetune_main(finetune_argv(str(fm), tmp_path / 'ft', tmp_path)) == 0

  # Greedy decoding of the imported model equals transformers', 64 tokens, past Gemma's window of 16.
  prompts = [' '.join(corpus(3, seed)).replace('\n', ' ')[:60 + 20 * seed] for seed in (0, 1)]
  gen = generate_lib.generate(restored, prompts, max_new_tokens=64)
  for ids, out in zip(gen.prompt_tokens, gen.tokens):
    assert len(ids) + len(out) > 3 * 16
    assert out == hf_greedy(model, ids, 64)[:len(out)] and len(out) >= 32, (len(out), out)
