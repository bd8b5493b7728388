"""Benchmark the train step: `python -m fmjax.bench --config CONFIG [--config.x=y ...]`.

Runs the real compiled train step on synthetic tokens and reports compile time, median step
time, tokens/s, TFLOP/s per device, MFU against the device peak (a measured matmul peak on
CPU) and peak memory, as a table and as JSON. `--sweep "a=1,b=2;a=3"` compares several sets
of overrides in one run; `--torch-reference PATH` runs a PyTorch baseline script at the same
shape, alternating with fmjax, and reports the ratio. `--data` measures the input pipeline of
the config instead (no model): loader tokens/s for each `--workers` count (data.worker_count).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time

from fmjax import cli
from fmjax import config as config_lib
from fmjax.runtime import hugepages

def bench_config(cfg, steps: int = 10, warmup: int = 2) -> dict:
  """Time `steps` train steps of cfg on synthetic tokens; returns the measurements."""
  import jax
  import numpy as np
  from fmjax.training import build
  from fmjax.perf import flops as metrics

  run = build.build_lm_run(cfg)
  state = run.init(jax.random.PRNGKey(cfg.seed))
  rng = np.random.default_rng(0)
  b, t = cfg.global_batch_size, cfg.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  host = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.ones((b, t), np.int32),
          'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          'weights': np.ones((b, t), np.float32)}
  batch = {k: jax.device_put(v, run.batch_sharding) for k, v in host.items()}
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, out = run.train_step(state, batch)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  from fmjax.training import optim, state as state_lib
  opt_bytes = optim.state_bytes(run.state.abstract.opt_state) / state_lib.param_count(run.state.abstract.params)
  device = jax.devices()[0]
  peak = metrics.device_peak_flops(device, cfg.cpu_peak_flops, cfg.model.dtype)
  flop_devices = jax.process_count() if device.platform == 'cpu' else jax.device_count()
  result = {
      'compile_s': run.compile_seconds,
      'step_ms': step_time * 1e3,
      'loss': float(out['loss']),
      'peak_tflops_per_device': peak / 1e12,
      'opt_state_bytes_per_param': opt_bytes,
      **metrics.throughput(cfg.model, t, b * t, step_time, flop_devices, peak),
  }
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    result['peak_memory_gib'] = stats['peak_bytes_in_use'] / 2**30
  else:
    mem = run.train_step.memory_analysis()
    if mem is not None:
      result['peak_memory_gib'] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**30
  return result


def bench_data(cfg, workers: int, seconds: float = 10.0) -> dict:
  """Loader throughput of cfg's train data with `workers` tokenizing processes (one process's share:
  global_batch_size rows of seq_len tokens per batch, as a single-host run reads them)."""
  from fmjax.data import pipeline, tokenizers
  tokenizer = tokenizers.load_tokenizer(cfg.data.tokenizer)
  data_cfg = cfg.data.copy_and_resolve_references()
  data_cfg.worker_count = workers
  started = time.perf_counter()
  it = pipeline.make_train_iterator(data_cfg, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.global_batch_size,
                                    seed=cfg.seed)
  try:
    next(it)   # opens (builds) the data and starts the workers
    first_s = time.perf_counter() - started
    cpu0, start, batches = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
      next(it)
      batches += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
  finally:
    it.close()
  tokens = batches * cfg.global_batch_size * cfg.seq_len
  return {'name': f'workers={workers}', 'worker_count': workers, 'first_batch_s': first_s, 'batches': batches,
          'tokens_per_s': tokens / elapsed, 'main_process_cpu_share': cpu / elapsed}


def format_data_table(rows: list[dict]) -> str:
  cols = ['name', 'tokens_per_s', 'batches', 'first_batch_s', 'main_process_cpu_share']
  fmt = lambda v: f'{v:,.4g}' if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, '')) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  line = lambda vals: '  '.join(v.rjust(w) for v, w in zip(vals, widths))
  return '\n'.join([line(cols)] + [line(r) for r in cells])


def _data_command(args, overrides: list[str]) -> int:
  cfg = config_lib.resolve(cli.config_path(args.config), overrides)
  try:
    counts = [int(w) for w in args.workers.split(',') if w.strip()]
  except ValueError:
    counts = []
  if not counts or min(counts) < 0:
    raise config_lib.ConfigError(f'--workers {args.workers!r} must be a comma-separated list of counts >= 0')
  rows = []
  for workers in counts:
    rows.append(bench_data(cfg, workers, args.seconds))
    print_progress(format_data_table(rows), first=len(rows) == 1)
  print(format_data_table(rows))
  print(json.dumps(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=2)
  return 0


def torch_reference(script: str, text: str, cfg, steps: int) -> dict:
  """Run the PyTorch baseline at cfg's shape; returns its JSON line."""
  m = cfg.model
  cmd = [sys.executable, script, '--text', text, '--n-layer', str(m.num_layers), '--n-head', str(m.num_heads),
         '--n-embd', str(m.d_model), '--block-size', str(cfg.seq_len), '--batch-size',
         str(cfg.global_batch_size), '--steps', str(steps)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=hugepages.original_environment())
  return json.loads(out.stdout.strip().splitlines()[-1])


def parse_sweep(text: str) -> list[list[str]]:
  """'a=1,b=2;a=3' -> [['a=1', 'b=2'], ['a=3']]; an item without '=' is one more value of the key before it,
  so 'optim.name=adamw,muon' -> [['optim.name=adamw'], ['optim.name=muon']] (several such keys in a group:
  every combination)."""
  groups = []
  for group in text.split(';'):
    keys: list[tuple[str, list[str]]] = []
    for item in (i.strip() for i in group.split(',')):
      if '=' in item:
        key, value = item.split('=', 1)
        keys.append((key, [value]))
      elif item and keys:
        keys[-1][1].append(item)
      elif item:
        raise config_lib.ConfigError(f'--sweep: {item!r} follows no KEY=VALUE; write KEY=V1,V2,... or "a=1,b=2;a=3"')
    groups += [[f'{k}={v}' for (k, _), v in zip(keys, values)] for values in itertools.product(*(v for _, v in keys))
               if keys]
  return groups


def format_table(rows: list[dict]) -> str:
  cols = ['name', 'compile_s', 'step_ms', 'tokens_per_s', 'tflops_per_device', 'mfu', 'peak_memory_gib']
  cols += sorted({k for r in rows for k in r} - set(cols) - {'loss', 'peak_tflops_per_device'})
  fmt = lambda v: f'{v:,.4g}' if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, '')) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  line = lambda vals: '  '.join(v.rjust(w) for v, w in zip(vals, widths))
  return '\n'.join([line(cols)] + [line(r) for r in cells])


def print_progress(table: str, first: bool) -> None:
  """A row on stderr as soon as it is measured: the last line of `table`, after its header for the first row."""
  lines = table.splitlines()
  print('\n'.join(lines if first else lines[-1:]), file=sys.stderr, flush=True)


def run_command(args, overrides: list[str]) -> int:
  """`python -m fmjax.bench` after its flags are parsed (fmjax/bench.py): the table and JSON rows."""
  if args.data:
    return _data_command(args, overrides)
  config_path = cli.config_path(args.config)
  if args.torch_reference and (not os.path.isfile(args.torch_reference) or not os.path.isfile(args.text)):
    raise config_lib.ConfigError('--torch-reference and --text must name existing files')
  groups = parse_sweep(args.sweep) or [[]]
  rows = []
  for _ in range(args.repeats):
    for group in groups:
      cfg = config_lib.resolve(config_path, overrides + list(group))
      row = {'name': ','.join(group) or 'fmjax', **bench_config(cfg, args.steps)}
      rows.append(row)
      print_progress(format_table(rows), first=len(rows) == 1)
    if args.torch_reference:
      ref = torch_reference(args.torch_reference, args.text, cfg, max(args.steps, 20))
      rows.append({'name': 'torch-reference', 'tokens_per_s': ref['tokens_per_s'], 'step_ms': ref['step_ms']})
  print(format_table(rows))
  if args.torch_reference:
    ours = statistics.median(r['tokens_per_s'] for r in rows if r['name'] != 'torch-reference')
    theirs = statistics.median(r['tokens_per_s'] for r in rows if r['name'] == 'torch-reference')
    print(f'fmjax / torch-reference tokens/s: {ours / theirs:.2f}x')
  print(json.dumps(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=2)
  return 0
