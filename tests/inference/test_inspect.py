"""Inspection: attention probabilities, logit lens, per-token loss, PNG/JSON outputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import inspect as inspect_command
from fmjax.inference import inspect as fm_inspect
from fmjax.checkpoints import restore
from fmjax.model import Transformer
from fmjax.model import layout
from helpers import tiny_config
from helpers import train_tiny


def test_capture_scanned_equals_unrolled_and_rows_sum_to_one():
  tokens = jnp.asarray([[1, 5, 9, 3, 7, 2]])
  scanned = Transformer(tiny_config(scan_layers=True).model)
  params = jax.jit(scanned.init)(jax.random.PRNGKey(0), tokens)['params']
  unrolled = Transformer(tiny_config(scan_layers=False).model)
  a = jax.jit(lambda p, t: fm_inspect.capture(scanned, p, t))(params, tokens)
  b = jax.jit(lambda p, t: fm_inspect.capture(unrolled, p, t))(layout.scanned_to_unrolled(params, 2), tokens)
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  attention = np.asarray(a[1])                                    # (L, B, H, T, T)
  assert attention.shape == (2, 1, 4, 6, 6)
  np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
  assert np.abs(np.triu(attention, k=1)).max() < 1e-6             # causal


def test_analyse_and_cli(tmp_path_factory, tmp_path, capsys):
  workdir = train_tiny(tmp_path_factory.getbasetemp())
  restored = restore.restore(workdir)
  result = fm_inspect.analyse(restored, 'the cat sat', top_k=3)
  np.testing.assert_allclose(result['attention'].sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(result['lens_probs'][-1], result['output_probs'], atol=1e-5)   # last layer = output
  assert len(result['token_loss']) == len(result['tokens']) - 1

  out = tmp_path / 'out'
  assert inspect_command.main(['--workdir', workdir, '--prompt', 'the dog', '--out', str(out)]) == 0
  files = sorted(os.listdir(out))
  assert files == ['attention_layer0.png', 'attention_layer1.png', 'inspect.json', 'logit_lens.png',
                   'token_loss.png']
  for name in files:
    if name.endswith('.png'):
      assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  data = json.loads((out / 'inspect.json').read_text())
  t = len(data['tokens'])
  assert data['tokens'][0] == '<bos>' and t == 8
  assert np.asarray(data['attention']).shape == (2, 4, t, t)
  assert len(data['logit_lens']) == 2 and len(data['logit_lens'][0]) == t and len(data['token_loss']) == t - 1
  capsys.readouterr()
  assert inspect_command.main(['--workdir', str(tmp_path / 'none'), '--prompt', 'x', '--out', str(out)]) == 2
  assert inspect_command.main(['--workdir', workdir, '--prompt', 'x' * 40, '--out', str(out)]) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 2 and all(e.startswith('fmjax.inspect: error: ') for e in errors), errors
