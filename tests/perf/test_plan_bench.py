"""fmjax.plan's memory against a live run; fmjax.bench's measurements and output."""

import json
import re
import time

import jax
import numpy as np
import pytest

from fmjax import bench as bench_command
from fmjax import plan as plan_command
from fmjax.training import build
from fmjax.perf import flops as metrics
from fmjax.perf import plan
from helpers import tiny_config


def test_plan_memory_matches_the_live_state_on_each_device(capsys):
  cfg = tiny_config(num_heads=8, num_kv_heads=8, d_model=64)
  cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
  p = plan.plan(cfg, memory_gib=1.0, peak_flops=1e12)
  assert 'compiling' not in capsys.readouterr().err   # a short compile prints no elapsed-time lines
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


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_plan_cli_rejects_a_config_that_does_not_fit(capsys, tmp_path):
  code = plan_command.main(['--config', 'configs/default.py', '--devices', '8', '--memory-gib', '0.001'])
  out = capsys.readouterr()
  assert code == 2 and 'DOES NOT FIT' in out.out
  assert out.err.startswith('fmjax.plan: error: ') and 'needs' in out.err and out.err.count('\n') == 1, out.err
  assert plan_command.main(['--config', 'configs/default.py', '--devices', '8', '--memory-gib', '4']) == 0
  assert plan_command.main(['--config', 'configs/default.py', '--topology', 'v9x-3']) == 2


def test_flops_formula_against_a_hand_count():
  cfg = tiny_config(num_heads=4, num_kv_heads=2, d_model=32, mlp_dim=64, vocab_size=64).model
  # q,o: 32x32 each; k,v: 32x16 each; swiglu: 3 x 32x64; head 32x64; 2 layers
  n = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 32 * 64
  assert metrics.matmul_params(cfg) == n
  attention = 4 * 2 * (16 + 1) / 2 * 4 * 8
  assert metrics.flops_per_token(cfg, 16) == 3 * (2 * n + attention)


def test_bench_reports_a_table_and_json(capsys, tmp_path):
  out_json = tmp_path / 'bench.json'
  code = bench_command.main(['--config', 'configs/nanogpt_cpu.py', '--steps', '2', '--config.model.num_layers=1',
                             '--config.mesh.data=8', '--config.global_batch_size=16',
                             '--sweep', 'model.remat=none;model.remat=full', '--out', str(out_json)])
  assert code == 0
  rows = json.loads(out_json.read_text())
  assert [r['name'] for r in rows] == ['model.remat=none', 'model.remat=full']
  for r in rows:
    assert r['tokens_per_s'] > 0 and 0 < r['mfu'] and r['step_ms'] > 0 and r['compile_s'] > 0
  assert rows[0]['loss'] == rows[1]['loss']           # remat changes memory, not the numbers
  out = capsys.readouterr()
  assert 'tokens_per_s' in out.out
  progress = [line.split() for line in out.err.splitlines()]   # a row on stderr as each run finishes
  header = [i for i, words in enumerate(progress) if words[:3] == ['name', 'compile_s', 'step_ms']]
  rows = [i for i, words in enumerate(progress) if words and words[0].startswith('model.remat=')]
  assert len(header) == 1 and [progress[i][0] for i in rows] == ['model.remat=none', 'model.remat=full'], out.err
  assert header[0] < rows[0], out.err                         # the header before the first row


def test_a_long_plan_compile_prints_elapsed_lines(capsys):
  cfg = tiny_config()
  cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
  plan.plan(cfg, target='v5p-8', every=0.01)     # every compile is "long" at 10 ms
  err = capsys.readouterr().err
  assert re.search(r'^compiling the train step for v5p-8 \.\.\. \d+ s$', err, re.M), err
  assert re.search(r'^compiling the train step for v5p-8: done in \d+ s$', err, re.M), err
  plan.plan(cfg, every=0.01)                     # no target: the mesh names it
  assert 'compiling the train step for data=2 fsdp=2 tensor=2 (8 devices, cpu) ...' in capsys.readouterr().err


def _compiled_hlo_size(layers, scan):
  cfg = tiny_config(num_layers=layers, scan_layers=scan)
  return len(build.build_lm_run(cfg).train_step.as_text())


@pytest.mark.slow
def test_scanned_program_does_not_grow_with_depth():
  """Scanned layers compile one block for any depth (the issue target was compile time; the compiled
  program's size is the timing-free proxy): 48 scanned layers within 10 % of 2, while unrolling
  6 layers makes it clearly bigger (so the measure does see depth)."""
  two, many = _compiled_hlo_size(2, True), _compiled_hlo_size(48, True)
  assert many <= 1.1 * two, (two, many)
  assert _compiled_hlo_size(6, False) > 1.5 * two


def _numpy_matmul_flops(n=256, seconds=0.2):
  """fp32 matmul FLOP/s measured with numpy's BLAS on one thread (multi-threaded BLAS on a shared
  CPU swings 50x between runs), independently of JAX."""
  import threadpoolctl  # comes with scikit-learn (test extra)
  a = np.ones((n, n), np.float32)
  with threadpoolctl.threadpool_limits(1):
    a @ a
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      a @ a
      count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def test_cpu_peak_is_a_plausible_measurement_in_the_compute_dtype():
  """The fp32 peak lies within a wide band of numpy's matmul rate (a unit or timing bug is off by 100x+),
  and a bf16 run's peak is a separate bf16 measurement, not the fp32 one reused."""
  metrics.measure_cpu_peak_flops.cache_clear()
  fp32 = metrics.measure_cpu_peak_flops(n=256, seconds=0.2)
  reference = _numpy_matmul_flops()
  assert 0.1 < fp32 / reference < 10, (fp32, reference)
  metrics.measure_cpu_peak_flops.cache_clear()
  cpu = jax.devices('cpu')[0]
  bf16_peak = metrics.device_peak_flops(cpu, 0.0, 'bfloat16')
  fp32_peak = metrics.device_peak_flops(cpu, 0.0, 'float32')
  assert bf16_peak != fp32_peak                      # two timings, never bit-equal unless one is reused
  assert 0.2 < bf16_peak / fp32_peak < 10, (bf16_peak, fp32_peak)
  assert 0.1 < fp32_peak / reference < 10, (fp32_peak, reference)
  assert metrics.device_peak_flops(cpu, 123.0, 'bfloat16') == 123.0   # a configured peak wins


# ------------------------------------------------------------------------ the CLI on targets
# In subprocesses: fmjax.plan picks its devices before jax starts, as a user's command does.

def plan_cli(*args, timeout=600):
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return subprocess.run([sys.executable, '-m', 'fmjax.plan', *args], cwd=root, env=env, capture_output=True,
                        text=True, timeout=timeout)


def gib(out: str, row: str) -> float:
  import re
  return float(re.search(rf'^  {row} +([\d.,]+) GiB', out, re.M).group(1).replace(',', ''))


needs_libtpu = pytest.mark.skipif(__import__('importlib').util.find_spec('libtpu') is None,
                                  reason='needs the tpu extra (libtpu) to compile for TPU topologies')


@pytest.mark.slow
@needs_libtpu
def test_llama_1b_names_its_slice_and_fits_it_with_splash_on_two_slices():
  """No --topology: the plan uses config.topology (v5p-8), here 2 slices of it with data parallelism
  across them (mesh.dcn.data=2); the shipped batch fits with the splash kernel, the per-chip memory
  agrees with a hand count (fp32 params + 2 AdamW moments, sharded over a slice's chips), and what
  crosses the slices is all-reduces of the gradients only (read from the compiled program's transfers)."""
  import re
  from fmjax import cli, config as config_lib
  cfg = config_lib.resolve(cli.config_path('llama_1b'), [])
  kind, chips = plan.parse_topology(cfg.topology)
  r = plan_cli('--config', 'configs/llama_1b.py', '--num-slices', '2', '--config.mesh.dcn.data=2')
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'topology: 2 x {cfg.topology} (config.topology' in r.stdout
  assert 'attention: splash' in r.stdout + r.stderr
  assert f'devices: {2 * chips}  over 2 slices ' in r.stdout and '(fits)' in r.stdout
  assert "'data': 2, 'fsdp': 4" in r.stdout
  dcn = re.search(r'^across slices \(DCN\) per step and device: (.*)$', r.stdout, re.M).group(1)
  assert re.fullmatch(r'all-reduce [\d.,]+ GiB', dcn), dcn   # gradient reductions only: no gather, no permute
  sent = float(dcn.split()[1].replace(',', ''))
  # the gradients of each microbatch (bf16 where the compute is; the reduction runs inside the accumulation loop)
  assert 0.5 * gib(r.stdout, 'parameters') <= sent <= 1.2 * cfg.microbatches * gib(r.stdout, 'parameters'), sent
  m = cfg.model
  n_params = (2 * m.vocab_size * m.d_model + m.num_layers * (
      m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * m.d_model * m.mlp_dim + 2 * m.d_model)
      + m.d_model)
  assert gib(r.stdout, 'parameters') == pytest.approx(n_params * 4 / chips / 2**30, rel=0.02)
  assert gib(r.stdout, 'optimizer state') == pytest.approx(2 * n_params * 4 / chips / 2**30, rel=0.02)
  assert gib(r.stdout, 'total') < metrics.ACCELERATORS[kind].hbm_gib


@pytest.mark.slow
@needs_libtpu
def test_an_oversize_config_exits_2_with_one_line_naming_needed_and_available():
  """Embedding + head of 2 x 524288 x 4096 in fp32 with AdamW: ~17 GiB per v5e chip of 16 GiB before
  any activation. `v5litepod-4` is gcloud's name for the slice."""
  r = plan_cli('--config', 'configs/default.py', '--topology', 'v5litepod-4', '--config.model.vocab_size=524288',
               '--config.model.d_model=4096', '--config.model.num_layers=1', '--config.model.mlp_dim=512',
               '--config.global_batch_size=4')
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith('fmjax.plan: error: ')]
  assert len(errors) == 1 and 'does not fit' in errors[0], r.stderr[-3000:]
  assert 'Traceback' not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize('target', [['--devices', '4'], ['--topology', 'h100-4']], ids=['devices', 'gpu-topology'])
def test_devices_and_gpu_topologies_plan_with_libtpu_installed(target):
  """With libtpu importable (it loads with jax), a CPU-device plan still works: N fake devices, the
  GPU's memory for a GPU topology."""
  r = plan_cli('--config', 'configs/default.py', *target, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'devices: 4 ' in r.stdout
  if target[0] == '--topology':
    assert 'of 80.000 GiB (fits)' in r.stdout and 'predicted at 50% MFU' in r.stdout


def test_num_slices_without_a_tpu_topology_is_one_line(capsys):
  assert plan_command.main(['--config', 'configs/default.py', '--devices', '8', '--num-slices', '2']) == 2
  err = capsys.readouterr().err
  assert err.startswith('fmjax.plan: error: --num-slices 2 needs a TPU --topology and libtpu') and err.count('\n') == 1
