"""Shared test helpers: tiny configs, synthetic batches, corpora, and tiny trained runs."""

import csv
import os

import numpy as np

from fmjax import config


def tiny_config(**model_overrides):
  """A run config for a model small enough to train in a test on CPU."""
  cfg = config.base_config()
  cfg.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_seq_len=16))
  cfg.model.update(model_overrides)
  cfg.seq_len = 16
  cfg.global_batch_size = 8
  cfg.optim.warmup_steps = 2
  cfg.steps = 10
  cfg.progress_bar = False
  return cfg


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0, packed: bool = False) -> dict:
  """A deterministic LM batch in fmjax's format; with `packed`, two documents per row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(batch, seq_len + 1)).astype(np.int32)
  seg = np.ones((batch, seq_len), np.int32)
  pos = np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))
  if packed:
    cut = seq_len // 2
    seg[:, cut:] = 2
    pos[:, cut:] -= cut
  weights = np.ones((batch, seq_len), np.float32)
  if packed:
    weights[:, cut - 1] = 0.0
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': seg, 'positions': pos,
          'weights': weights}


def write_corpus(directory, n_files: int = 12, seed: int = 0) -> str:
  """Small text files of varied length in `directory`; returns their glob."""
  import os
  rng = np.random.default_rng(seed)
  words = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hum jazz'.split()
  os.makedirs(directory, exist_ok=True)
  for i in range(n_files):
    text = ' '.join(rng.choice(words, size=int(rng.integers(40, 200))))
    with open(os.path.join(directory, f'doc{i:03d}.txt'), 'w') as f:
      f.write(text + '\n')
  return os.path.join(str(directory), '*.txt')


def text_run_config(tmp_path, **top):
  """A tiny run config training on a generated text corpus in tmp_path."""
  cfg = tiny_config()
  cfg.model.vocab_size = 264  # byte tokenizer (259) padded to a multiple of 8 for tensor sharding
  cfg.data.source = 'text'
  cfg.data.files = write_corpus(tmp_path / 'corpus')
  cfg.data.cache_dir = str(tmp_path / 'cache')
  cfg.data.validation_fraction = 0.2
  cfg.workdir = str(tmp_path / 'workdir')
  cfg.log_every = 1
  cfg.async_checkpoints = False
  return with_fields(cfg, **top)


def with_fields(cfg, **top):
  """Set top-level fields of cfg; a dict value updates that section."""
  for k, v in top.items():
    if isinstance(v, dict):
      cfg[k].update(v)
    else:
      cfg[k] = v
  return cfg


def losses_of(result) -> dict:
  """{step: loss} from a loop result's logged history."""
  return {s: m['loss'] for s, m in result.history}


def assert_same_tree(a, b):
  """Two parameter trees are bit-identical: same paths, dtypes, shapes and bytes."""
  import jax
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), jax.tree_util.keystr(path)

TEXT = 'the cat sat on the mat. the dog ate the bone.'




def train_tiny(base) -> str:
  """A workdir with a checkpoint of a tiny byte-level model trained on repetitive text (once per session)."""
  workdir = os.path.join(base, 'trained')
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return workdir
  from fmjax import train
  data = os.path.join(base, 'corpus')
  os.makedirs(data, exist_ok=True)
  for i in range(3):
    with open(os.path.join(data, f'doc{i}.txt'), 'w') as f:
      f.write(''.join(f'{TEXT} number {j}.\n\n' for j in range(100)))
  cfg = tiny_config(vocab_size=259, max_seq_len=32)
  cfg.seq_len = 32
  cfg.data.update(dict(source='text', files=os.path.join(data, '*.txt'), split_by='paragraph', cache_dir=data,
                       validation_fraction=0.1))
  cfg.update(dict(steps=25, checkpoint_every=0, log_every=10, async_checkpoints=False, cpu_peak_flops=1e11,
                  workdir=workdir))
  cfg.optim.learning_rate = 3e-3
  train.train(cfg)
  return workdir



CLASSES = {'red': 'a', 'green': 'm', 'blue': 'x'}


def pretrain_cfg(tmp):
  cfg = tiny_config(vocab_size=260)  # >= 259 byte tokens, even for tensor=2
  cfg.data.source = 'text'
  cfg.data.files = str(tmp / 'corpus' / '*.txt')
  cfg.data.cache_dir = str(tmp)
  cfg.workdir = str(tmp / 'pre')
  cfg.steps = 4
  cfg.checkpoint_every = 0
  cfg.async_checkpoints = False
  return cfg


def pretrain_tiny(tmp):
  os.makedirs(tmp / 'corpus')
  for i in range(20):
    (tmp / 'corpus' / f'{i}.txt').write_text(f'the quick brown fox {i} jumps over the lazy dog\n' * 8)
  cfg = pretrain_cfg(tmp)
  from fmjax import train
  result = train.train(cfg)
  return cfg, result.state.params


def write_csv(path, rows, header=('text', 'label')):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def separable_rows(n, seed):
  rng = np.random.default_rng(seed)
  names = sorted(CLASSES)
  rows = []
  for i in range(n):
    label = names[i % len(names)]
    noise = ''.join(rng.choice(list('0123456789 '), size=6))
    rows.append((CLASSES[label] * int(rng.integers(3, 8)) + noise, label))
  return rows


def ft_config(pretrained, tmp, **finetune_overrides):
  pre_cfg, _ = pretrained
  cfg = pre_cfg.copy_and_resolve_references()
  cfg.workdir = str(tmp / 'ft')
  cfg.finetune.init_from = pre_cfg.workdir
  cfg.finetune.train_files = write_csv(tmp / 'train.csv', separable_rows(48, 0))
  cfg.finetune.eval_files = write_csv(tmp / 'eval.csv', separable_rows(24, 1))
  cfg.finetune.epochs = 0   # these tests count steps
  cfg.finetune.update(finetune_overrides)
  cfg.steps = 30
  cfg.eval_every = 15
  cfg.log_every = 10
  cfg.optim.learning_rate = 3e-3
  cfg.optim.weight_decay = 0.0
  return cfg
