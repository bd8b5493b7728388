"""finetune.task=sft and dpo end to end on a tiny byte-level model: the shared run lifecycle, DPO's frozen
reference, resume, the mesh, generation samples and bad input."""

import io
import json
import math

import jax
import numpy as np
import pytest

from fmjax import config as config_lib
from fmjax.data.errors import DataError
from fmjax.finetune import chat, reference
from fmjax.finetune.run import finetune
from fmjax.objectives import preference
from helpers import pretrain_tiny


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  return pretrain_tiny(tmp_path_factory.mktemp('chatpre'))


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _qa(n, offset=0):
  return [(f'inc {i + offset}', str(i + offset + 1)) for i in range(n)]


def _sft_rows(n, offset=0):
  return [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]} for q, a in _qa(n, offset)]


def _pair_rows(n, offset=0):
  return [{'prompt': q, 'chosen': a, 'rejected': str(int(a) + 7)} for q, a in _qa(n, offset)]


def _cfg(pretrained, tmp, task, **top):
  pre_cfg, _ = pretrained
  cfg = pre_cfg.copy_and_resolve_references()
  cfg.workdir = str(tmp / task)
  ft = cfg.finetune
  ft.init_from, ft.task, ft.epochs, ft.validation_fraction = pre_cfg.workdir, task, 0, 0.0
  rows = _sft_rows if task == 'sft' else _pair_rows
  ft.train_files = _write(tmp / f'{task}_train.jsonl', rows(40))
  ft.eval_files = _write(tmp / f'{task}_eval.jsonl', rows(6, offset=100))
  ft.sample_prompts, ft.sample_tokens = 2, 4
  cfg.seq_len = 40   # a rendered exchange is about 30 bytes
  cfg.update(dict(steps=4, eval_every=4, log_every=2, checkpoint_every=0, async_checkpoints=False))
  cfg.optim.learning_rate = 3e-3
  cfg.update(top)
  return cfg


def test_sft_trains_on_assistant_tokens_and_writes_samples(pretrained, tmp_path):
  out = finetune(_cfg(pretrained, tmp_path, 'sft'))
  losses = [m['loss'] for _, m in out['history']]
  assert out['last_step'] == 4 and out['report']['loss'] > 0 and losses and all(map(math.isfinite, losses))
  samples = (tmp_path / 'sft' / 'eval' / 'samples_step_4.jsonl').read_text().splitlines()
  assert len(samples) == 2 and json.loads(samples[0])['answer'] == '101'


@pytest.mark.slow   # ~20 s: CI runs it in the slow suite
def test_sft_with_lora_trains_only_the_adapters(pretrained, tmp_path):
  from fmjax.model import lora
  cfg = _cfg(pretrained, tmp_path, 'sft', steps=3)
  cfg.finetune.update(dict(lora_rank=4, lora_alpha=8.0))
  out = finetune(cfg)
  _, before = pretrained
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  moved = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(out['state'].params)[0]:
    if lora.is_adapter_path(path):
      moved.append(float(np.abs(np.asarray(leaf)).max()))
    else:
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_before[path]), err_msg=str(path))
  assert moved and max(moved) > 0 and math.isfinite(out['report']['loss'])


def test_dpo_starts_at_log2_and_its_reference_is_the_starting_model(pretrained, tmp_path):
  """Step 1's loss is log 2 exactly when the reference is the starting parameters (policy = reference);
  the reference file holds the starting model's log-probabilities, not the trained one's."""
  cfg = _cfg(pretrained, tmp_path, 'dpo', steps=3, log_every=1)
  out = finetune(cfg)
  first = [m for step, m in out['history'] if step == 1]
  np.testing.assert_allclose(first[0]['loss'], math.log(2), rtol=1e-5)
  assert abs(first[0]['rewards/margins']) < 1e-5
  with np.load(tmp_path / 'dpo' / reference.FILE) as saved:
    train_chosen = saved['train_chosen']
  # Recompute from the pretrained parameters with a bare jit: equal; from the trained ones: different.
  from fmjax.finetune.parts import Parts
  from fmjax.data import tokenizers
  from fmjax.parallel import sharding as shd
  mesh = shd.make_mesh(cfg.mesh)
  parts = Parts(cfg, mesh, tokenizers.ByteTokenizer(), compile_step=False)
  _, params0 = pretrained
  rows = parts.pairs['train'].chosen
  start = reference.compute(parts.run, jax.device_put(params0, parts.run.state.shardings.params), rows)
  np.testing.assert_allclose(start, train_chosen, atol=1e-5)
  trained = reference.compute(parts.run, out['state'].params, rows)
  assert np.abs(trained - train_chosen).max() > 1e-3
  assert out['report']['pairs'] == 6


@pytest.mark.slow   # 15 s: CI runs it in the slow suite
def test_dpo_resume_equals_one_run(pretrained, tmp_path):
  """4 steps in one run equal 2 + 2 with a resume (which reads the reference file back)."""
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  whole_cfg = _cfg(pretrained, tmp_path / 'a', 'dpo')
  whole_cfg.optim.decay_steps = 4      # the same schedule whether the run is told 2 or 4 steps
  whole = finetune(whole_cfg)
  cfg = _cfg(pretrained, tmp_path / 'b', 'dpo', steps=2, checkpoint_every=2)
  cfg.optim.decay_steps = 4
  finetune(cfg)
  cfg.steps, cfg.allow_config_change = 4, True
  resumed = finetune(cfg)
  assert [s for s, _ in resumed['history']] == [4]
  for a, b in zip(jax.tree.leaves(whole['state'].params), jax.tree.leaves(resumed['state'].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pair_layout_keeps_pairs_whole_under_microbatching():
  """Pair i sits at rows i and P + i; microbatch m of n takes rows m, m+n, ...: its first half are the
  chosen rows of the pairs whose rejected rows form its second half."""
  p, t = 4, 3
  chosen = {k: np.arange(p * t).reshape(p, t) + 1000 for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  chosen['weights'] = np.ones((p, t), np.float32)
  rejected = {k: v + 5000 if k != 'weights' else v for k, v in chosen.items()}
  batch = chat.pair_layout(chosen, rejected, np.array([2, 0, 3, 1]), (np.ones((p, t)), np.zeros((p, t))))
  n = 2
  for m in range(n):
    rows = batch['inputs'][m::n]
    half = len(rows) // 2
    np.testing.assert_array_equal(rows[:half] + 5000, rows[half:])
  assert batch[preference.REFERENCE_KEY][:p].sum() == p * t and batch[preference.REFERENCE_KEY][p:].sum() == 0


def test_dpo_refuses_an_odd_batch_and_missing_files(pretrained, tmp_path):
  cfg = _cfg(pretrained, tmp_path, 'dpo', global_batch_size=3)
  with pytest.raises(config_lib.ConfigError, match='global_batch_size=3 must be even'):
    finetune(cfg)
  cfg = _cfg(pretrained, tmp_path, 'sft')
  cfg.finetune.eval_files = ''
  with pytest.raises(DataError, match='finetune.task=sft needs finetune.eval_files'):
    finetune(cfg)


def test_reference_file_of_other_data_is_refused(tmp_path):
  rows = {'train_chosen': {'inputs': np.zeros((2, 3), np.int32), 'targets': np.zeros((2, 3), np.int32),
                           'weights': np.ones((2, 3), np.float32)}}
  buf = io.BytesIO()
  np.savez(buf, fingerprint=np.asarray('not this data'), train_chosen=np.zeros((2, 3), np.float32))
  (tmp_path / reference.FILE).write_bytes(buf.getvalue())
  with pytest.raises(DataError, match='computed for other data'):
    reference.load_or_compute(str(tmp_path), True, None, None, rows, print)
  (tmp_path / reference.FILE).unlink()
  with pytest.raises(DataError, match='is missing, and a resumed run cannot recompute'):
    reference.load_or_compute(str(tmp_path), True, None, None, rows, print)


def test_packed_conversations_do_not_see_each_other(pretrained):
  """A packed SFT row (encode_sft: segment ids and positions per conversation) gives each conversation the
  logits it has alone, with the pretrained model."""
  from fmjax.data import chat_templates, conversations, tokenizers
  from fmjax.model.transformer import Transformer
  pre_cfg, params = pretrained
  template = chat_templates.for_tokenizer(tokenizers.ByteTokenizer())
  chats = [conversations.Conversation(r['messages'], f'c:{i}') for i, r in enumerate(_sft_rows(2, offset=40))]
  alone = [template.render(c.messages).ids for c in chats]
  seq_len = len(alone[0]) + len(alone[1]) - 1
  packed, counts = conversations.encode_sft(chats, template, seq_len=seq_len)
  assert packed['inputs'].shape == (1, seq_len) and counts.kept == 2
  model = Transformer(pre_cfg.model)

  def logits(tokens, positions=None, segments=None):
    return np.asarray(model.apply({'params': params}, tokens, positions, segments))[0]
  got = logits(packed['inputs'], packed['positions'], packed['segment_ids'])
  a = len(alone[0])
  np.testing.assert_allclose(got[:a], logits(alone[0][None]), atol=1e-5)
  np.testing.assert_allclose(got[a:], logits(alone[1][None, :-1]), atol=1e-5)


@pytest.mark.slow   # ~20 s: CI runs it in the slow suite
def test_dpo_with_lora_trains_adapters_against_the_base_model(pretrained, tmp_path):
  """With LoRA the reference is the base model (adapters start at zero): step 1's loss is log 2, the base
  weights stay as they were, and the adapters move."""
  from fmjax.model import lora
  cfg = _cfg(pretrained, tmp_path, 'dpo', steps=3, log_every=1)
  cfg.finetune.update(dict(lora_rank=4, lora_alpha=8.0))
  out = finetune(cfg)
  first = [m for step, m in out['history'] if step == 1][0]
  np.testing.assert_allclose(first['loss'], math.log(2), rtol=1e-5)
  _, before = pretrained
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(out['state'].params)[0]:
    if not lora.is_adapter_path(path):
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_before[path]), err_msg=str(path))
  assert float(np.abs(np.asarray(lora.adapter_params(out['state'].params)['layers']['attn']['q']['lora_b'])).max()) > 0
  assert out['history'][-1][1]['rewards/margins'] != 0
