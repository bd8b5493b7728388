"""Masked-LM pretraining end to end through `python -m fmjax.train`: SIGKILL + resume is bit-exact
(the masks are a function of (seed, step, example), not of the process), eval reports MLM loss."""

import json
import os

import pytest

from helpers import write_corpus
from cli_runs import SERIAL, checkpoints, kill_after_checkpoint, logged_losses, train_cli, train_records

pytestmark = pytest.mark.slow

ENCODER = ('--config.model.kind=encoder', '--config.model.activation=gelu_exact', '--config.model.norm=layernorm',
           '--config.model.positions=learned', '--config.model.use_bias=true', '--config.mlm.whole_word=true')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('encoder_e2e')
  return {'files': write_corpus(root / 'corpus', n_files=24), 'cache': str(root / 'cache')}


def _run(*extra):
  return (*ENCODER, '--config.model.d_model=128', '--config.model.mlp_dim=512', '--config.seq_len=32',
          '--config.global_batch_size=32', '--config.steps=30', '--config.checkpoint_every=10',
          '--config.async_checkpoints=false', '--config.optim.decay_steps=30', '--config.eval_every=15',
          '--config.eval_batches=2', *extra)


def test_mlm_sigkill_after_a_checkpoint_resumes_bit_identically(tmp_path, data):
  ref = tmp_path / 'ref'
  assert train_cli(ref, data, *_run(), devices=1, env=SERIAL) == [0]
  run = tmp_path / 'run'
  kill_after_checkpoint(run, data, _run())
  assert checkpoints(run)[-1] < 30
  assert train_cli(run, data, *_run(), devices=1, env=SERIAL) == [0]
  want, got = logged_losses(ref), logged_losses(run)
  for step in range(11, 31):
    assert got[step] == want[step], step                    # bit-identical (fp32, CPU)
  assert train_records(run) == train_records(ref)
  with open(os.path.join(ref, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r['split'] == 'train']
  evals = [r for r in records if r['split'] == 'eval']
  assert evals and all(0 < r['tokens'] < 0.3 * 64 * 32 for r in evals)   # scored on masked tokens only
  assert all(r['tokens'] < 0.3 * 32 * 32 for r in train)
