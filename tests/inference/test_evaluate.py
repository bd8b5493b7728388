"""Evaluation: evaluate_params against a NumPy reference, sharded == unsharded, the CLI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.training import build
from fmjax import evaluate as evaluate_command
from fmjax.inference import evaluate
from fmjax.parallel import sharding as shd
from fmjax.model import Transformer
from helpers import synthetic_batch, tiny_config
from helpers import train_tiny


def _numpy_reference(logits, batch, token_bytes):
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  loss_sum = ((logz - target) * batch['weights']).sum()
  weight = batch['weights'].sum()
  nbytes = (token_bytes[batch['targets']] * batch['weights']).sum()
  return loss_sum, weight, nbytes


def test_evaluate_params_matches_reference_and_sharded_run():
  cfg = tiny_config()
  model = Transformer(cfg.model)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))['params']
  batches = [synthetic_batch(8, 16, 64, seed=s, packed=s == 1) for s in range(2)]
  token_bytes = np.arange(64) % 3
  out = evaluate.evaluate_params(model, params, batches, token_bytes)
  sums = np.sum([_numpy_reference(model.apply({'params': params}, b['inputs'], b['positions'], b['segment_ids']),
                                  b, token_bytes) for b in batches], axis=0)
  assert out['loss'] == pytest.approx(sums[0] / sums[1], rel=1e-5)
  assert out['perplexity'] == pytest.approx(math.exp(sums[0] / sums[1]), rel=1e-5)
  assert out['bits_per_byte'] == pytest.approx(sums[0] / (math.log(2) * sums[2]), rel=1e-5)
  assert out['tokens'] == sums[1]
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh), compile_step=False)   # fsdp over 8 devices
  sharded = jax.device_put(params, run.state.shardings.params)
  evaluator = evaluate.make_evaluator(run, token_bytes)
  assert evaluator(sharded, batches)['loss'] == pytest.approx(out['loss'], rel=1e-5)


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_cli(tmp_path_factory, tmp_path, capsys):
  workdir = train_tiny(tmp_path_factory.getbasetemp())
  assert evaluate_command.main(['--workdir', workdir, '--batches', '2', '--split', 'train']) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  fields = dict(f.split('=') for f in line.split(' (')[0].split())
  assert float(fields['loss']) < math.log(259) - 1.0
  assert float(fields['perplexity']) == pytest.approx(math.exp(float(fields['loss'])), rel=1e-3)
  assert 'bits_per_byte' in fields and "split 'train'" in line
  assert evaluate_command.main(['--workdir', str(tmp_path / 'none')]) == 2
  assert evaluate_command.main(['--workdir', workdir, '--split', 'nosuchsplit']) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 2 and all(e.startswith('fmjax.evaluate: error: ') for e in errors), errors
