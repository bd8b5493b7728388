"""LoRA: only adapters train; merging them reproduces the adapted model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import finetune
from fmjax.parallel import sharding as shd
from fmjax.model import Transformer, lora
from helpers import ft_config, write_csv


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_only_adapters_change_and_merge_matches(pretrained, tmp_path):  # noqa: F811
  pre_cfg, before = pretrained
  cfg = ft_config(pretrained, tmp_path, task='prompt', lora_rank=4, lora_alpha=8.0)
  rows = [(f'say {w}:', f' {w[::-1]}') for w in ('alpha', 'beta', 'gamma', 'delta', 'omega', 'sigma')] * 3
  cfg.finetune.train_files = write_csv(tmp_path / 'p.csv', rows, ('prompt', 'response'))
  cfg.finetune.eval_files = cfg.finetune.train_files
  cfg.steps, cfg.eval_every = 4, 4
  out = finetune.finetune(cfg)
  after = out['state'].params
  adapters = lora.adapter_params(after)
  assert adapters['layers']['attn']['q']['lora_a'].shape == (2, 32, 4)
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  changed = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
    if lora.is_adapter_path(path):
      changed.append(path)
      continue
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_before[path]), err_msg=str(path))
  b = adapters['layers']['attn']['q']['lora_b']
  assert float(jnp.abs(b).max()) > 0                     # B started at zero and has trained
  assert (tmp_path / 'ft' / 'adapters').is_dir()

  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(8, 16)), jnp.int32)
  mesh = shd.make_mesh(cfg.mesh)
  with shd.activate(mesh, shd.axis_rules(cfg)):
    adapted = Transformer(lora.with_lora(cfg.model, 4, 8.0, cfg.finetune.lora_targets)).apply({'params': after}, tokens)
    merged = Transformer(pre_cfg.model).apply({'params': lora.merge(after, 8.0, 4)}, tokens)
    base = Transformer(pre_cfg.model).apply({'params': before}, tokens)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=1e-5)
  assert float(jnp.abs(adapted - base).max()) > 1e-4     # the adapters do something


def test_no_lora_keeps_the_plain_parameter_tree():
  from helpers import tiny_config
  cfg = tiny_config()
  tokens = jnp.zeros((1, 8), jnp.int32)
  plain = Transformer(cfg.model).init(jax.random.PRNGKey(0), tokens)['params']
  adapted = Transformer(lora.with_lora(cfg.model, 2, 4.0, ('q', 'wo'))).init(jax.random.PRNGKey(0), tokens)['params']
  assert lora.strip_adapters(adapted).keys() == plain.keys()
  assert jax.tree.structure(lora.strip_adapters(adapted)) == jax.tree.structure(plain)
  assert set(lora.adapter_params(adapted)['layers']) == {'attn', 'mlp'}
  assert 'lora_a' not in plain['layers']['attn']['q']
