"""Fine-tuning: exact loading, learning a separable task on a (2,2,2) mesh, freezing, bad inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import finetune, train
from fmjax.checkpoints import restore
from fmjax.parallel import sharding as shd
from fmjax.checkpoints.store import CheckpointError
from fmjax.objectives.classification import HEAD
from fmjax.data import labeled
from fmjax.data.errors import DataError
from fmjax.data.tokenizers import ByteTokenizer
from fmjax.model import Transformer
from helpers import ft_config, tiny_config, write_csv


def _parts(cfg):
  mesh = shd.make_mesh(cfg.mesh)
  parts = finetune.Parts(cfg, mesh, ByteTokenizer(), compile_step=False)
  state = parts.run.init(jax.random.PRNGKey(cfg.seed))
  src, step, _ = restore.locate_checkpoint(cfg.finetune.init_from)
  return parts, state.replace(params=parts.load_pretrained(state.params, src, step))


@pytest.mark.parametrize('lora_rank', [0, 4])
def test_loaded_model_gives_the_pretrained_logits(pretrained, tmp_path, lora_rank):
  pre_cfg, pre_params = pretrained
  cfg = ft_config(pretrained, tmp_path, lora_rank=lora_rank)
  parts, state = _parts(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(8, 16)), jnp.int32)
  with shd.activate(parts.run.mesh, parts.run.rules):
    want = Transformer(pre_cfg.model).apply({'params': pre_params}, tokens)
    lm_params = {k: v for k, v in state.params.items() if k != HEAD}
    got = parts.run.model.apply({'params': lm_params}, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert HEAD in state.params


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_learns_separable_task_on_a_2x2x2_mesh(pretrained, tmp_path):
  cfg = ft_config(pretrained, tmp_path, head_learning_rate=1e-2)
  cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
  out = finetune.finetune(cfg)
  assert out['report']['accuracy'] >= 0.95, out['report']
  q = out['state'].params['layers']['attn']['q']['kernel']
  assert q.addressable_shards[0].data.shape[1:3] == (16, 2)    # embed over fsdp, heads over tensor
  work = tmp_path / 'ft'
  for name in ('best.json', 'eval/step_30.json', 'config.json', 'checkpoints', 'best', 'tensorboard'):
    assert (work / name).exists(), name
  assert out['best']['macro_f1'] >= out['report']['macro_f1'] - 1e-9


def test_freezing_keeps_embeddings_and_first_blocks(pretrained, tmp_path):
  cfg = ft_config(pretrained, tmp_path, freeze_embeddings=True, freeze_layers=1, pooling='mean')
  cfg.steps, cfg.eval_every = 3, 3
  out = finetune.finetune(cfg)
  _, before = pretrained
  after = out['state'].params
  np.testing.assert_array_equal(after['embedding'], before['embedding'])
  for path, leaf in jax.tree_util.tree_flatten_with_path(after['layers'])[0]:
    old = dict(jax.tree_util.tree_flatten_with_path(before['layers'])[0])[path]
    np.testing.assert_array_equal(leaf[0], old[0])
    assert not np.array_equal(leaf[1], old[1]) or 'scale' in jax.tree_util.keystr(path), path


def test_mismatched_checkpoint_is_a_clear_error(pretrained, tmp_path, capsys):
  cfg = ft_config(pretrained, tmp_path)
  cfg.model.d_model = 64
  with pytest.raises(CheckpointError, match='d_model=32'):
    finetune.finetune(cfg)
  code = finetune.main(['--config', os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'finetune_stdlib.py'),
                        f'--config.init_from={cfg.finetune.init_from}', '--workdir', str(tmp_path / 'x'),
                        '--config.model.vocab_size=259'])   # an override contradicting the checkpoint's model
  assert code == 2
  assert 'model.vocab_size=260' in capsys.readouterr().err


def test_bad_labelled_data_errors(pretrained, tmp_path):
  cfg = ft_config(pretrained, tmp_path)
  ft = cfg.finetune
  ft.eval_files = write_csv(tmp_path / 'bad.csv', [('aaa', 'red'), ('zzz', 'purple')])
  data = labeled.load_split(ft, 'eval', ('text', 'label'))
  with pytest.raises(DataError, match="label 'purple'.*not in the label set"):
    labeled.label_ids(data['label'], ('blue', 'green', 'red'), 'eval')
  ft.train_files = write_csv(tmp_path / 'empty.csv', [])
  with pytest.raises(DataError, match='no examples'):
    labeled.load_split(ft, 'train', ('text', 'label'))
  with pytest.raises(DataError, match="no column 'body'"):
    labeled.load_split(ft, 'eval', ('body', 'label'))
  (tmp_path / 'x.jsonl').write_text('{"text": "a"}\n')
  ft.source, ft.train_files = 'jsonl', str(tmp_path / 'x.jsonl')
  with pytest.raises(DataError, match="no field 'label'"):
    labeled.load_split(ft, 'train', ('text', 'label'))


def test_encodings():
  tok = ByteTokenizer()
  b = labeled.encode_classification(['ab', 'abcdefghijklmnop'], np.array([1, 0]), tok, 8)
  assert b['inputs'][0, :4].tolist() == [tok.bos_id, 3 + 97, 3 + 98, tok.eos_id]
  assert b['weights'][0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
  assert b['weights'][1].tolist() == [0] * 7 + [1]
  assert b['targets'][:, 0].tolist() == [1, 0]
  p = labeled.encode_prompt_response(['ab'], ['cd'], tok, 8)
  # row: bos a b c d eos; targets a b c d eos: weight only on c, d, eos
  assert p['weights'][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
  it = labeled.EpochBatches(b, 2, seed=0)
  first = [next(it)['targets'][:, 0].tolist() for _ in range(3)]
  assert [next(labeled.EpochBatches(b, 2, seed=0).start(2))['targets'][:, 0].tolist()] == first[2:]


def _facts(n_words=48, seed=0):
  """Made-up 4-letter words, each of one of two classes (alternating): knowledge that only pretraining
  on sentences like 'qzkx is fruit.' can give, so fine-tuning on half the words cannot reach the rest."""
  rng = np.random.default_rng(seed)
  letters = list('abcdeghjklmnopqrtuwxyz')
  words = sorted({''.join(rng.choice(letters, 4)) for _ in range(n_words * 2)})[:n_words]
  words = [words[i] for i in rng.permutation(len(words))]
  return words, ['fruit' if i % 2 else 'metal' for i in range(n_words)], rng


@pytest.mark.slow
def test_demo_pretrained_beats_random_init(tmp_path, capsys):
  """`--demo` fine-tunes from the checkpoint and from random init and prints both. The shipped demo
  task (stdlib packages) needs a real pretraining run to show the gap, too slow for a test, so this
  uses a small setting where the gap is certain: the model is pretrained (300 tiny steps) on
  'word is class.' facts; the demo fine-tunes on half the words and evaluates on the other half.
  Random init can only guess those (accuracy ~0.5); the pretrained model knows them (~0.75)."""
  words, classes, rng = _facts()
  (tmp_path / 'corpus').mkdir()
  lines = [f'{words[i]} is {classes[i]}.' for _ in range(60) for i in rng.permutation(len(words))]
  (tmp_path / 'corpus' / 'facts.txt').write_text('\n'.join(lines) + '\n')
  cfg = tiny_config(vocab_size=264, max_seq_len=32)
  cfg.seq_len, cfg.global_batch_size, cfg.steps = 32, 16, 300
  cfg.data.update(dict(source='text', files=str(tmp_path / 'corpus' / '*.txt'), cache_dir=str(tmp_path / 'cache'),
                       validation_fraction=0.0))
  cfg.update(dict(workdir=str(tmp_path / 'pre'), checkpoint_every=0, async_checkpoints=False, cpu_peak_flops=1e11,
                  log_every=100))
  cfg.optim.update(dict(learning_rate=3e-3, warmup_steps=10))
  train.train(cfg)
  half = len(words) // 2
  train_csv = write_csv(tmp_path / 'train.csv', [(f'{w} is', c) for w, c in zip(words[:half], classes[:half])] * 2)
  eval_csv = write_csv(tmp_path / 'eval.csv', [(f'{w} is', c) for w, c in zip(words[half:], classes[half:])])
  model = [f'--config.model.{k}={v}' for k, v in cfg.model.items() if k in ('vocab_size', 'd_model', 'num_layers',
                                                                           'num_heads', 'num_kv_heads', 'mlp_dim',
                                                                           'max_seq_len')]
  code = finetune.main(['--demo', f'--config.init_from={cfg.workdir}', '--workdir', str(tmp_path / 'demo'),
                        # the setting this test was sized for (30 steps, 20 of them warmup, no validation split:
                        # 24 train words leave none to spare); on 24 eval words the gap is noisy elsewhere
                        '--config.finetune.epochs=0', '--config.steps=30', '--config.finetune.warmup_ratio=0',
                        '--config.optim.warmup_steps=20', '--config.finetune.validation_fraction=0',
                        '--config.eval_every=30', '--config.seq_len=16',
                        '--config.global_batch_size=8', '--config.finetune.source=csv',
                        f'--config.finetune.train_files={train_csv}', f'--config.finetune.eval_files={eval_csv}',
                        '--config.finetune.pooling=last', '--config.finetune.head_learning_rate=1e-2',
                        '--config.progress_bar=false', '--config.cpu_peak_flops=1e11', *model])
  assert code == 0
  out = capsys.readouterr().out
  assert 'pretrained' in out and 'random init' in out and 'macro_f1' in out
  reports = json.loads((tmp_path / 'demo' / 'demo.json').read_text())
  assert 'n-gram baseline' in reports and 'n-gram baseline' in out
  pre, rand = reports['pretrained'], reports['random init']
  assert pre['accuracy'] >= rand['accuracy'] + 0.15, (pre, rand)
  assert pre['macro_f1'] >= rand['macro_f1'] + 0.15, (pre, rand)
