"""MoE on meshes with an expert axis: the same loss and gradients as one device; the expert weights split.

Slow (four meshes compiled): CI runs the slow suite too."""

import math

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow

from fmjax.parallel import sharding as shd
from fmjax.training import build
from fmjax.training import step as step_lib
from helpers import synthetic_batch, tiny_config, with_fields

MESHES = [dict(expert=4, data=2, fsdp=1), dict(expert=2, fsdp=2, tensor=2), dict(expert=8, fsdp=1)]


def _cfg(mesh, **model):
  cfg = tiny_config(num_experts=8, num_experts_per_tok=2, moe_mlp_dim=32, moe_aux_loss=0.1,
                    moe_router_z_loss=0.01, **model)
  return with_fields(cfg, mesh=dict(dict(data=1, fsdp=1, expert=1, tensor=1), **mesh))


def _batch(run, seed):
  cfg = run.cfg
  batch = synthetic_batch(cfg.global_batch_size, cfg.seq_len, cfg.model.vocab_size, seed=seed, packed=True)
  return {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}


def _train(mesh, steps=3, **model):
  """(gradients at the initial parameters, per-step metrics, final state) of 3 steps on `mesh`."""
  cfg = _cfg(mesh, **model)
  devices = jax.devices()[:math.prod(mesh.values())]
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, devices))
  state = run.init(jax.random.PRNGKey(0))
  loss = step_lib.lm_loss_fn(run.model, cfg.z_loss, cfg.model.loss_vocab_chunk)
  grad = jax.jit(jax.grad(lambda p, b: loss(p, b, None)[0]),
                 in_shardings=(run.state.shardings.params, {k: run.batch_sharding for k in step_lib.BATCH_KEYS}))
  with shd.activate(run.mesh, run.rules):
    grads = jax.device_get(grad(state.params, _batch(run, 0)))
  history = []
  for i in range(steps):
    state, metrics = run.train_step(state, _batch(run, i))
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return grads, history, state


@pytest.fixture(scope='module')
def single():
  return _train(dict(fsdp=1))


# megablox interpreted on CPU; ragged_dot's mesh path is the same code (tests/model/test_moe.py: kernels agree)
CASES = [(m, 'blocked') for m in MESHES] + [(MESHES[1], 'megablox')]


@pytest.mark.parametrize('mesh,kernel', CASES,
                         ids=[','.join(f'{k}={v}' for k, v in m.items() if v > 1) + f'-{k}' for m, k in CASES])
def test_an_expert_mesh_gives_the_single_device_loss_and_gradients(single, mesh, kernel):
  ref_grads, ref_history, _ = single
  grads, history, state = _train(mesh, moe_kernel=kernel)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for key in ('loss', 'objective', 'moe_aux_loss', 'moe_z_loss', 'moe_load_max', 'grad_norm'):
    np.testing.assert_allclose([h[key] for h in history], [h[key] for h in ref_history], rtol=1e-5, err_msg=key)
  wi = state.params['layers']['moe']['wi_0']                 # (layers, experts, embed, mlp)
  shard = wi.addressable_shards[0].data.shape
  assert shard[1] == 8 // mesh['expert'] and shard[3] == 32 // mesh.get('tensor', 1), shard


def test_the_aux_loss_moves_the_objective(single):
  _, history, _ = single
  first = history[0]
  assert first['objective'] - first['loss'] == pytest.approx(0.1 * first['moe_aux_loss'] + 0.01 * first['moe_z_loss'],
                                                             rel=1e-4)
  assert 0.0 < first['moe_load_min'] <= 1 / 8 <= first['moe_load_max']
