"""fmjax.plan's memory against a live run; fmjax.bench's measurements and output."""

import json

import jax
import numpy as np
import pytest

from fmjax import bench, build, metrics, plan
from helpers import tiny_config


def test_plan_memory_matches_the_live_state_on_each_device():
  cfg = tiny_config(num_heads=8, num_kv_heads=8, d_model=64)
  cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
  p = plan.plan(cfg, memory_gib=1.0, peak_flops=1e12)
  run = build.build_lm_run(cfg, compile_step=False)
  state = run.init(jax.random.PRNGKey(0))
  dev = jax.devices()[0]
  live = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                          if s.device == dev)
  assert p['param_bytes'] == live(state.params)
  assert p['optimizer_bytes'] == live(state.opt_state)
  assert p['activation_bytes'] > 0 and p['fits'] is True
  total_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  assert p['param_bytes'] < total_params * 4          # sharded, not replicated
  assert p['flops_per_step'] == metrics.flops_per_token(cfg.model, 16) * 8 * 16


def test_plan_cli_rejects_a_config_that_does_not_fit(capsys, tmp_path):
  code = plan.main(['--config', 'configs/default.py', '--devices', '8', '--memory-gib', '0.001'])
  out = capsys.readouterr()
  assert code == 2 and 'DOES NOT FIT' in out.out and 'fmjax.plan: error: needs' in out.err
  assert plan.main(['--config', 'configs/default.py', '--devices', '8', '--memory-gib', '4']) == 0
  assert plan.main(['--config', 'configs/default.py', '--topology', 'v9x-3']) == 2


def test_flops_formula_against_a_hand_count():
  cfg = tiny_config(num_heads=4, num_kv_heads=2, d_model=32, mlp_dim=64, vocab_size=64).model
  # q,o: 32x32 each; k,v: 32x16 each; swiglu: 3 x 32x64; head 32x64; 2 layers
  n = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 32 * 64
  assert metrics.matmul_params(cfg) == n
  attention = 4 * 2 * (16 + 1) / 2 * 4 * 8
  assert metrics.flops_per_token(cfg, 16) == 3 * (2 * n + attention)


def test_bench_reports_a_table_and_json(capsys, tmp_path):
  out_json = tmp_path / 'bench.json'
  code = bench.main(['--config', 'configs/nanogpt_cpu.py', '--steps', '2', '--config.model.num_layers=1', '--config.mesh.data=8',
                     '--config.global_batch_size=16',
                     '--sweep', 'model.remat=none;model.remat=full', '--json', str(out_json)])
  assert code == 0
  rows = json.loads(out_json.read_text())
  assert [r['name'] for r in rows] == ['model.remat=none', 'model.remat=full']
  for r in rows:
    assert r['tokens_per_s'] > 0 and 0 < r['mfu'] and r['step_ms'] > 0 and r['compile_s'] > 0
  assert rows[0]['loss'] == rows[1]['loss']           # remat changes memory, not the numbers
  assert 'tokens_per_s' in capsys.readouterr().out


@pytest.mark.slow
def test_scanned_compile_time_does_not_grow_with_depth():
  """48 scanned layers compile in at most 1.5x the time of 2 (issue target)."""
  from fmjax import build
  from helpers import tiny_config

  def compile_seconds(layers):
    cfg = tiny_config(num_layers=layers, scan_layers=True)
    return build.build_lm_run(cfg).compile_seconds

  compile_seconds(2)  # warm the tracing caches
  two, many = min(compile_seconds(2) for _ in range(2)), compile_seconds(48)
  assert many <= 1.5 * two, (two, many)


def test_cpu_peak_is_measured_in_the_compute_dtype():
  """A bf16 run's MFU is taken against a bf16 matmul peak, not the (lower, here) fp32 one."""
  fp32 = metrics.measure_cpu_peak_flops(n=256, seconds=0.1)
  bf16 = metrics.measure_cpu_peak_flops(n=256, seconds=0.1, dtype='bfloat16')
  assert fp32 > 0 and bf16 > 0
  assert metrics.device_peak_flops(jax.devices()[0], 0.0, 'bfloat16') == metrics.measure_cpu_peak_flops(
      dtype='bfloat16')
