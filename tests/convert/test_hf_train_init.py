"""`fmjax.train --init-from`: continued pretraining of an imported Hugging Face model takes its model,
tokenizer and parameters from the checkpoint; a contradicting model override is refused."""

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip('transformers')

from fmjax import train  # noqa: E402
from fmjax.checkpoints import restore
from fmjax.convert.cli import main as convert_main  # noqa: E402
from hf_models import corpus, make_llama3  # noqa: E402


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('init_from')
  make_llama3(root / 'hf')
  assert convert_main(['from-hf', '--hf-dir', str(root / 'hf'), '--out', str(root / 'fm')]) == 0
  (root / 'corpus').mkdir()
  for i, text in enumerate(corpus(40, seed=3)):
    (root / 'corpus' / f'{i}.txt').write_text(text * 3)
  return root


def argv(root, workdir, *extra):
  return ['--config', 'default', '--workdir', str(workdir), '--init-from', str(root / 'fm'),
          '--config.data.source=text', f'--config.data.files={root / "corpus" / "*.txt"}',
          f'--config.data.cache_dir={root / "cache"}', '--config.data.validation_fraction=0.0',
          '--config.steps=1', '--config.seq_len=32', '--config.global_batch_size=8',
          '--config.optim.learning_rate=1e-9',
          '--config.optim.end_learning_rate=0', '--config.optim.warmup_steps=0', '--config.optim.weight_decay=0',
          '--config.checkpoint_every=0', '--config.async_checkpoints=false', '--config.progress_bar=false',
          '--config.cpu_peak_flops=1e9', '--config.eval_every=0', *extra]


def test_train_init_from_an_imported_model(imported, tmp_path):
  assert train.main(argv(imported, tmp_path / 'run')) == 0
  source = restore.restore(str(imported / 'fm'))
  run = restore.restore(str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'config.json') as f:
    model = json.load(f)['model']
  for key, value in source.meta['model'].items():
    if key not in restore.MUTABLE_MODEL_KEYS:
      assert model[key] == value, key                     # rope llama3, theta 5e5, eps 1e-6, tying, GQA, context
  assert run.meta['tokenizer'] == 'hf_tokenizer/tokenizer.json'
  assert os.path.isfile(tmp_path / 'run' / 'hf_tokenizer' / 'tokenizer_config.json')
  assert run.tokenizer.encode('the quick fox').tolist() == source.tokenizer.encode('the quick fox').tolist()
  # One step at a learning rate of 1e-9 leaves the imported parameters (not a random init).
  for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(source.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_train_init_from_refuses_a_contradicting_model_override(imported, tmp_path, capsys):
  assert train.main(argv(imported, tmp_path / 'run', '--config.model.norm_eps=1e-5')) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'norm_eps=1e-05' in err and 'norm_eps=1e-06' in err, err
