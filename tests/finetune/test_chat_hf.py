"""An imported tiny Qwen2 model with a real ChatML template (tokenizer.json + tokenizer_config.json built in
the test) fine-tunes with finetune.task=sft and exports: the export keeps the chat template, AutoTokenizer
renders a prompt to the ids fmjax trained on, and transformers' logits equal fmjax's fine-tuned ones."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import chat_fixtures  # noqa: E402
from fmjax import cli  # noqa: E402
from fmjax.convert import driver, source, verify  # noqa: E402
from fmjax.data import chat_templates, tokenizers  # noqa: E402
from fmjax.finetune.run import finetune  # noqa: E402
from fmjax.checkpoints import restore  # noqa: E402
from fmjax import generate as generate_command  # noqa: E402
from fmjax.inference import generate as generate_lib  # noqa: E402
from hf_models import save_perturbed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = [('What is two plus two?', 'Four.'), ('The capital of France?', 'Paris.'),
             ('Say hello.', 'Hello!'), ('Add a and b.', 'a + b')]


def _chats(n, offset=0):
  rows = []
  for i in range(n):
    q, a = QUESTIONS[(i + offset) % len(QUESTIONS)]
    rows.append({'messages': [{'role': 'system', 'content': 'Answer briefly.'}, {'role': 'user', 'content': q},
                              {'role': 'assistant', 'content': a}]})
  return rows


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


@pytest.fixture(scope='module')
def imported_qwen(tmp_path_factory):
  """(HF directory, fmjax workdir) of a perturbed tiny Qwen2ForCausalLM with the Qwen-style tokenizer."""
  base = tmp_path_factory.mktemp('qwenchat')
  hf_dir = base / 'hf'
  chat_fixtures.qwen_style_tokenizer(hf_dir)
  vocab = transformers.AutoTokenizer.from_pretrained(str(hf_dir)).__len__()
  torch.manual_seed(0)
  config = transformers.Qwen2Config(vocab_size=vocab + (-vocab) % 8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, tie_word_embeddings=False)
  save_perturbed(transformers.Qwen2ForCausalLM(config), hf_dir, scale=0.02)
  driver.from_hf(str(hf_dir), str(base / 'fm'), log=lambda s: None)
  return hf_dir, base / 'fm'


@pytest.mark.slow   # a whole import -> fine-tune -> export -> generate run (~40 s)
def test_imported_qwen_sfts_and_exports_with_its_chat_template(imported_qwen, tmp_path, capsys):
  hf_dir, fm_dir = imported_qwen
  overrides = []   # as from the command line: the model is the checkpoint's
  cfg = cli.load_run_config(os.path.join(ROOT, 'configs', 'finetune_chat.py'), str(tmp_path / 'sft'), overrides)
  ft = cfg.finetune
  ft.init_from, ft.validation_fraction = str(fm_dir), 0.0
  ft.train_files = _write(tmp_path / 'train.jsonl', _chats(24))
  ft.eval_files = _write(tmp_path / 'eval.jsonl', _chats(4, offset=1))
  ft.sample_prompts, ft.sample_tokens = 2, 4
  cfg.update(dict(steps=3, eval_every=3, log_every=1, seq_len=64, global_batch_size=8, checkpoint_every=0,
                  async_checkpoints=False))
  cfg.optim.update(dict(learning_rate=1e-3, warmup_steps=1, decay_steps=3))
  out = finetune(cfg, overrides)
  assert out['last_step'] == 3 and np.isfinite(out['report']['loss'])
  samples = [json.loads(s) for s in (tmp_path / 'sft' / 'eval' / 'samples_step_3.jsonl').read_text().splitlines()]
  assert [s['answer'] for s in samples] == ['Paris.', 'Hello!']

  export = tmp_path / 'export'
  src = source.open_source(str(tmp_path / 'sft'))
  result = driver.to_hf(src, str(export), log=lambda s: None)
  with open(hf_dir / 'tokenizer_config.json') as f:
    template = json.load(f)['chat_template']
  with open(export / 'tokenizer_config.json') as f:
    assert json.load(f)['chat_template'] == template

  # The prompt fmjax trained and sampled with is the ids AutoTokenizer renders from the export.
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
  fm_tok = tokenizers.load_tokenizer(os.path.join(str(fm_dir), src.tokenizer) if not os.path.isabs(src.tokenizer)
                                     else src.tokenizer)
  fm_template = chat_templates.for_tokenizer(fm_tok, '')
  prompt = _chats(1, offset=2)[0]['messages'][:2]
  want = hf_tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
  np.testing.assert_array_equal(fm_template.prompt_ids(prompt), np.asarray(want))
  whole = _chats(1, offset=2)[0]['messages']
  np.testing.assert_array_equal(fm_template.render(whole).ids,
                                np.asarray(hf_tok.apply_chat_template(whole, tokenize=True, return_dict=False)))

  # The exported weights are the fine-tuned ones (not the imported ones): transformers' logits equal fmjax's.
  model = transformers.AutoModelForCausalLM.from_pretrained(str(export), torch_dtype=torch.float32)
  tokens = np.asarray([want])
  with torch.no_grad():
    hf = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  fm = verify.fmjax_logits(result['params'], src.model, tokens)
  assert np.abs(fm - hf).max() < 1e-4
  before = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
  with torch.no_grad():
    assert np.abs(before(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy() - hf).max() > 1e-3

  # `fmjax.generate --chat` on the fine-tuned checkpoint: the template the command uses renders the ids
  # AutoTokenizer renders, and its greedy answer (to the end of the assistant turn) is transformers'.
  chat = [{'role': 'system', 'content': 'Answer briefly.'}, {'role': 'user', 'content': 'Say hello.'}]
  restored = restore.restore(str(tmp_path / 'sft'))
  template = generate_lib.chat_template(restored)
  ids = template.prompt_ids(chat)
  np.testing.assert_array_equal(ids, hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False))
  got = generate_lib.generate_ids(restored, [ids], 8, stop_ids=template.stop_ids).tokens[0]
  with torch.no_grad():
    hf_greedy = model.generate(torch.as_tensor(np.asarray(ids)[None]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=list(template.stop_ids))[0, len(ids):].tolist()
  assert got == hf_greedy[:len(got)] and len(got) > 0, (got, hf_greedy)
  capsys.readouterr()
  assert generate_command.main(['--workdir', str(tmp_path / 'sft'), '--chat', '--system', 'Answer briefly.',
                                '--prompt', 'Say hello.', '--max-new-tokens', '8']) == 0
  assert "--- [1] 'Say hello.'" in capsys.readouterr().out
