"""Train step: sharding equivalence, gradient accumulation, scan/remat equivalence, loss maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.training import build
from fmjax.training import optim
from fmjax.training import step as step_lib
from fmjax.parallel import sharding as shd
from fmjax.model import layout
from fmjax.training.state import TrainState
from helpers import synthetic_batch, tiny_config, with_fields


def _cfg(**top):
  return with_fields(tiny_config(num_heads=8, num_kv_heads=8, d_model=64), **top)


def train_losses(cfg, steps=3, return_state=False):
  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:abs(np.prod([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]))])
  run = build.build_lm_run(cfg, mesh)
  if cfg.model.scan_layers:
    state = run.init(jax.random.PRNGKey(cfg.seed))
  else:  # start from the scanned model's parameters, relaid out, so the runs are comparable
    scanned = cfg.copy_and_resolve_references()
    scanned.model.scan_layers = True
    s_run = build.build_lm_run(scanned, mesh, compile_step=False)
    params = layout.scanned_to_unrolled(s_run.init(jax.random.PRNGKey(cfg.seed)).params, cfg.model.num_layers)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=run.tx.init(params))
    state = jax.device_put(state, run.state.shardings)
  losses = []
  for i in range(steps):
    batch = synthetic_batch(cfg.global_batch_size, cfg.seq_len, cfg.model.vocab_size, seed=i, packed=True)
    batch = {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}
    state, metrics = run.train_step(state, batch)
    losses.append(float(metrics['loss']))
  return (losses, state) if return_state else losses


@pytest.mark.slow   # several whole meshes trained: with the slow suite (CI runs both)
def test_losses_equal_on_every_mesh_and_params_are_split():
  ref = train_losses(_cfg(mesh=dict(data=1, fsdp=1, tensor=1)))
  assert ref[-1] < ref[0]
  for shape in [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]:
    cfg = _cfg(mesh=dict(zip(('data', 'fsdp', 'tensor'), shape)))
    losses, state = train_losses(cfg, return_state=True)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=f'mesh {shape}')
    q = state.params['layers']['attn']['q']['kernel']          # (layers, embed, heads, kv)
    shard = q.addressable_shards[0].data.shape
    data, fsdp, tensor = shape
    assert shard == (2, 64 // fsdp, 8 // tensor, 8), (shape, shard)
    mu = state.opt_state[1][0].mu['layers']['attn']['q']['kernel']  # optimizer state sharded alike
    assert mu.addressable_shards[0].data.shape == shard


def test_gradient_accumulation_equals_full_batch():
  full = train_losses(_cfg(mesh=dict(data=2, fsdp=2, tensor=2)), return_state=True)
  micro = train_losses(_cfg(mesh=dict(data=2, fsdp=2, tensor=2), microbatches=4), return_state=True)
  np.testing.assert_allclose(micro[0], full[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(micro[1].params), jax.tree.leaves(full[1].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize('model', [dict(scan_layers=False), dict(remat='full'), dict(remat='dots'),
                                   dict(remat='names', remat_names='qkv,mlp_hidden'),
                                   dict(scan_layers=False, remat='full'), dict(attention='chunked',
                                                                               attention_chunk=8),
                                   dict(attention='xla')])
def test_layouts_and_remat_give_the_same_loss(model):
  ref = train_losses(_cfg())  # attention 'auto' = 'dense' on CPU
  np.testing.assert_allclose(train_losses(_cfg(model=model)), ref, rtol=1e-5)


def test_dense_attention_with_causal_blocks_trains_like_xla_on_a_mesh():
  long = dict(mesh=dict(data=2, fsdp=2, tensor=2), seq_len=128, global_batch_size=4)
  ref = train_losses(_cfg(model=dict(attention='xla', max_seq_len=128), **long))
  np.testing.assert_allclose(train_losses(_cfg(model=dict(max_seq_len=128), **long)), ref, rtol=1e-5)


@pytest.mark.slow   # several whole meshes trained: with the slow suite (CI runs both)
@pytest.mark.parametrize('tie', [False, True])
def test_vocab_chunked_loss_trains_like_full_logits_on_a_mesh(tie):
  mesh = dict(data=2, fsdp=2, tensor=2)
  ref = train_losses(_cfg(mesh=mesh, model=dict(tie_embeddings=tie)))
  got = train_losses(_cfg(mesh=mesh, z_loss=0.5, model=dict(tie_embeddings=tie, loss_vocab_chunk=24)))
  ref_z = train_losses(_cfg(mesh=mesh, z_loss=0.5, model=dict(tie_embeddings=tie)))
  np.testing.assert_allclose(got, ref_z, rtol=1e-5)
  assert not np.allclose(ref, ref_z, rtol=1e-7)  # the z-loss reaches the chunked path's gradients


def test_unknown_remat_name_is_one_clear_line():
  from fmjax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match='remat_names: unknown nope'):
    config_lib.validate(with_fields(tiny_config(remat='names', remat_names='qkv,nope')))


def test_cross_entropy_matches_numpy_with_mask_and_z_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  ce, z, w = step_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), 1e-3)
  log_z = np.log(np.exp(logits).sum(-1))
  want = ((log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * weights).sum()
  np.testing.assert_allclose(float(ce), want, rtol=1e-5)
  np.testing.assert_allclose(float(z), 1e-3 * (log_z ** 2 * weights).sum(), rtol=1e-5)
  assert float(w) == weights.sum()


def test_weight_decay_mask_exempts_norms_and_biases():
  params = {'layers': {'attn_norm': {'scale': 1}, 'attn': {'q': {'kernel': 1, 'bias': 1}}}, 'embedding': 1}
  mask = optim.weight_decay_mask(params)
  assert mask == {'layers': {'attn_norm': {'scale': False}, 'attn': {'q': {'kernel': True, 'bias': False}}},
                  'embedding': True}


def test_dimension_not_divisible_by_mesh_is_named():
  cfg = _cfg(mesh=dict(data=1, fsdp=1, tensor=8))
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 4
  cfg.model.head_dim = 16
  with pytest.raises(shd.MeshError, match=r"\['attn'\]\['[kq]'\]\['kernel'\].*not divisible by mesh axes \('tensor',\)"):
    build.build_lm_run(cfg, shd.make_mesh(cfg.mesh), compile_step=False)


def _loop_step_times(tmp_path, eval_sleep: float) -> dict:
  """{step: logged step_time} of a short loop whose evaluate sleeps `eval_sleep` s at steps 3 and 6."""
  import time
  from fmjax.training import loop
  from fmjax.training import writers as metric_writers
  cfg = with_fields(tiny_config(), mesh=dict(data=1, fsdp=1, tensor=1))
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
  batches = (synthetic_batch(cfg.global_batch_size, cfg.seq_len, cfg.model.vocab_size, seed=i) for i in range(100))

  def evaluate(state, step):
    time.sleep(eval_sleep)
    return {'loss': 0.0}

  def save(step, state, wait):
    time.sleep(eval_sleep)

  writer = metric_writers.MetricWriter(str(tmp_path), 8, progress_bar=False)
  try:
    result = loop.run_loop(train_step=run.train_step, state=run.init(jax.random.PRNGKey(0)), batches=batches,
                           batch_sharding=run.batch_sharding, start_step=0, total_steps=8, writer=writer,
                           model_cfg=cfg.model, seq_len=cfg.seq_len, tokens_per_step=cfg.global_batch_size * cfg.seq_len,
                           log_every=1, evaluate=evaluate, eval_every=3, save=save, checkpoint_every=4,
                           cpu_peak_flops=1e9)
  finally:
    writer.close()
  return {s: m['step_time'] for s, m in result.history if 'step_time' in m}


def test_throughput_window_leaves_out_eval_and_checkpoint_time(tmp_path):
  times = _loop_step_times(tmp_path / 'slow', eval_sleep=1.0)
  # every step after the first (which includes the first dispatch) is timed; evals at 3, 6, 8 and saves at
  # 4, 8 each slept 1 s, yet no window shows it (a tiny step takes milliseconds)
  assert sorted(times) == list(range(1, 9))
  assert max(times[s] for s in range(2, 9)) < 0.5, times
