"""Compile-only TPU checks of the meshes past one slice and one sequence length.

Multislice: libtpu describes 2 x v5p-8 (`num_slices=2`), `mesh.dcn.data=2` puts data parallelism across the
slices, and the compiled program's cross-slice transfers (fmjax/perf/dcn_traffic.py) must be gradient
reductions only: all-reduces whose size follows the parameters, not the tokens of the step.
Context parallelism: mesh.sequence over a v5p-8 compiles with the splash kernel per query chunk.
llama_1b on 2 x v5p-8 is tests/perf/test_plan_bench.py's plan of the preset (the same check, from the CLI).
"""

from __future__ import annotations

import pytest

pytest.importorskip('libtpu', reason='TPU compile tests need the tpu extra (pip install -e ".[test]" installs it)')

from fmjax.perf import dcn_traffic  # noqa: E402
from fmjax.perf import plan  # noqa: E402
from fmjax.parallel import sharding as shd  # noqa: E402
from fmjax.training import build  # noqa: E402
from fmjax.training.state import param_count  # noqa: E402
from helpers import tiny_config  # noqa: E402
from test_tpu_compile import kernels, SPLASH_KERNELS  # noqa: E402


@pytest.fixture(scope='module')
def two_slices():
  devices = plan.tpu_devices('v5p-8', num_slices=2)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  return devices


def _tiny(seq_len=256, batch=16, **mesh):
  cfg = tiny_config(d_model=256, num_heads=2, num_kv_heads=1, head_dim=128, mlp_dim=512, vocab_size=512,
                    max_seq_len=1024)
  cfg.seq_len, cfg.global_batch_size = seq_len, batch
  cfg.model.attention = 'auto'
  dcn = mesh.pop('dcn', {})
  cfg.mesh.update(mesh)
  cfg.mesh.dcn.update(dcn)
  return cfg


def _compile(cfg, devices):
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, devices))
  return run, dcn_traffic.dcn_transfers(run.train_step.as_text())


def test_data_across_slices_sends_only_gradient_reductions(two_slices):
  small, sent = _compile(_tiny(dcn=dict(data=2), fsdp=4), two_slices)
  assert dict(small.mesh.shape) == dict(data=2, fsdp=4, expert=1, sequence=1, tensor=1)
  rows = [d.slice_index for d in small.mesh.devices[:, 0, 0, 0, 0]]
  assert rows == [0, 1]   # the data axis is the slice: each slice one data shard
  assert sent and {t.kind for t in sent} == {'ALL_REDUCE'}
  grad_shard = param_count(small.state.abstract.params) / 4   # fp32 gradients, FSDP over the 4 chips of a slice
  elements = sum(t.per_step for t in sent)
  assert grad_shard <= elements <= 2.5 * grad_shard, (elements, grad_shard)   # small tensors pad to (8, 128) tiles
  # 8x the tokens per step (4x rows, 2x length): the same DCN traffic, so no activation crosses the slices
  _, sent_big = _compile(_tiny(seq_len=512, batch=64, dcn=dict(data=2), fsdp=4), two_slices)
  assert sum(t.per_step for t in sent_big) == elements


def test_fsdp_across_slices_gathers_parameters_over_the_dcn(two_slices):
  run, sent = _compile(_tiny(dcn=dict(fsdp=2), fsdp=4), two_slices)
  assert dict(run.mesh.shape)['fsdp'] == 8
  assert 'ALL_GATHER' in {t.kind for t in sent} or 'REDUCE_SCATTER' in {t.kind for t in sent}, \
      {t.kind for t in sent}


def test_a_dcn_axis_that_does_not_match_the_slices_is_one_line(two_slices):
  with pytest.raises(shd.MeshError, match=r'^the devices form 2 slices but mesh.dcn.\* spans 1; set mesh.dcn.data'):
    shd.make_mesh(_tiny(fsdp=4, dcn=dict(data=1)).mesh, two_slices)


@pytest.mark.parametrize('strategy', ['all_gather_local_global', 'ring'])
def test_context_parallel_step_compiles_for_v5p_8(strategy):
  """mesh.sequence=4 over the 4 chips of a v5p-8, 1024 tokens a row: all_gather runs splash (forward and
  backward) for each shard's two zigzag chunks, here with Gemma 2's alternating local (a window mask offset
  per chunk) and global layers; ring runs its XLA blocks."""
  cfg = _tiny(seq_len=1024, batch=4, fsdp=1, sequence=4)
  if strategy == 'all_gather_local_global':
    cfg.model.update(dict(sliding_window=256, window_pattern='LG'))
    strategy = 'all_gather'
  cfg.model.context_attention = strategy
  run, _ = _compile(cfg, plan.tpu_devices('v5p-8'))
  found = kernels(run.train_step)
  if strategy == 'all_gather':
    assert set(SPLASH_KERNELS) <= found, found
  else:
    assert not found
  assert run.train_step.memory_analysis().temp_size_in_bytes < 2**30


def _preset(name, *overrides):
  from fmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.resolve(f'configs/{name}.py', list(overrides))


@pytest.mark.slow   # 1.1B parameters at 32k tokens a row compiled for v5p-8 (about 90 s)
def test_llama_1b_32k_preset_compiles_with_splash_per_context_shard_and_fits_v5p_8():
  cfg = _preset('llama_1b_32k')
  assert cfg.topology == 'v5p-8' and cfg.mesh.sequence == 4
  run, _ = _compile(cfg, plan.tpu_devices('v5p-8'))
  assert set(SPLASH_KERNELS) <= kernels(run.train_step)
  per_chip = (plan.per_device_bytes(run.state.abstract.params) + plan.per_device_bytes(run.state.abstract.opt_state)
              + run.train_step.memory_analysis().temp_size_in_bytes)
  assert per_chip < 95 * 2**30, per_chip / 2**30
