"""Plan a run before paying for it: `python -m fmjax.plan --config CONFIG [--topology NAME]`.

Lowers and compiles the real train step ahead of time for the target devices and prints, per
device: parameter, optimizer-state and activation (XLA temporaries) memory, the total against
the device memory, FLOPs per step, and the step time predicted at a stated MFU.

Without --topology or --devices it plans for the slice the config is sized for (`config.topology`,
e.g. v5p-8 for configs/llama_1b.py). With libtpu installed, `--topology v5p-32` (or gcloud's
`v5litepod-8` for v5e) compiles for that TPU topology
(`jax.experimental.topologies`). Without it the step is compiled for fake CPU devices of the
same count, which checks the shardings and gives XLA's memory estimate for those shardings.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Sequence

from fmjax import cli
from fmjax.errors import UserError
from fmjax.runtime import elapsed

# Chip layouts (libtpu topology names) of common slices; others via --tpu-topology-name.
TPU_TOPOLOGIES = {
    'v4-8': 'v4:2x2x1', 'v4-16': 'v4:2x2x2', 'v4-32': 'v4:2x2x4', 'v4-64': 'v4:2x4x4',
    'v5p-8': 'v5p:2x2x1', 'v5p-16': 'v5p:2x2x2', 'v5p-32': 'v5p:2x2x4', 'v5p-64': 'v5p:2x4x4',
    'v5e-4': 'v5e:2x2', 'v5e-8': 'v5e:2x4', 'v5e-16': 'v5e:4x4', 'v5e-32': 'v5e:4x8', 'v5e-64': 'v5e:8x8',
    'v6e-4': 'v6e:2x2', 'v6e-8': 'v6e:2x4', 'v6e-16': 'v6e:4x4', 'v6e-32': 'v6e:4x8', 'v6e-64': 'v6e:8x8',
}


COMPILE_REPORT_EVERY = 30.0   # seconds between the elapsed-time lines of a long compile


class PlanError(UserError):
  """The plan does not fit, or its inputs are wrong."""


def parse_topology(name: str) -> tuple[str, int]:
  """'v5p-32' -> ('v5p', 16 chips); 'h100-8' -> ('h100', 8). v4/v5p names count cores (2 per chip);
  gcloud's v5e name `v5litepod-N` is accepted beside `v5e-N`."""
  m = re.fullmatch(r'(v4|v5e|v5litepod|v5p|v6e|a100|h100|h200)-(\d+)', name.lower())
  if not m:
    raise PlanError(f'unknown topology {name!r}; use e.g. v5p-32, v6e-16, v5litepod-8, v4-8, h100-8 or h200-8')
  kind, n = m.group(1).replace('v5litepod', 'v5e'), int(m.group(2))
  chips = n // 2 if kind in ('v4', 'v5p') else n
  return kind, max(chips, 1)


def per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in __import__('jax').tree_util.tree_leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def is_tpu(kind: str | None) -> bool:
  """Whether a topology kind from `parse_topology` names TPU chips."""
  return bool(kind) and kind.startswith('v')


def tpu_devices(topology: str, topology_name: str = '', num_slices: int = 1):
  """Compile-only devices of a TPU topology (needs libtpu); v4 as megacore chips (one device per chip).
  `num_slices` > 1: that many slices joined by the data-centre network (libtpu's multislice description;
  each device has its `slice_index`)."""
  from jax.experimental import topologies
  key = topology.lower().replace('v5litepod', 'v5e')
  name = topology_name or TPU_TOPOLOGIES.get(key)
  if not name:
    raise PlanError(f'no chip layout known for {topology!r}; pass --tpu-topology-name e.g. v5p:2x2x4')
  kwargs = {'chip_config_name': 'megacore'} if name.startswith('v4') else {}
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  return topologies.get_topology_desc(topology_name=name, platform='tpu', **kwargs).devices


_EXHAUSTED = re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)')


def out_of_memory(error: Exception) -> PlanError | None:
  """A PlanError (needed vs available) for XLA's RESOURCE_EXHAUSTED compile error, else None."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  m = _EXHAUSTED.search(text)
  detail = (f'the step\'s temporaries need {m.group(1)}{m.group(2)} but {m.group(3)}{m.group(4)} of HBM is free '
            'after parameters and optimizer state') if m else text.strip().splitlines()[0][:200]
  return PlanError(f'does not fit: {detail}')


def plan(cfg, memory_gib: float | None = None, mfu: float = 0.5, peak_flops: float | None = None,
         devices=None, target: str = '', every: float = COMPILE_REPORT_EVERY) -> dict:
  """Compile cfg's train step for `devices` (default: all) and estimate memory and time per device.

  A compile longer than `every` seconds prints elapsed-time lines naming `target` (e.g. 'v5p-8';
  default: the mesh) on stderr."""
  from fmjax.training import build
  from fmjax.perf import flops as metrics
  from fmjax.parallel import sharding as shd

  mesh = shd.make_mesh(cfg.mesh, devices)
  try:
    with elapsed.report(f'compiling the train step for {target or shd.describe(mesh)}', every):
      run = build.build_lm_run(cfg, mesh)
  except Exception as e:  # noqa: BLE001 - only XLA's out-of-memory refusal is turned into a PlanError
    refusal = out_of_memory(e)
    if refusal is None:
      raise
    raise refusal from None
  mem = run.train_step.memory_analysis()
  params = per_device_bytes(run.state.abstract.params)
  optimizer = per_device_bytes(run.state.abstract.opt_state)
  activations = mem.temp_size_in_bytes if mem is not None else 0
  batch = per_device_bytes(run.abstract_batch())
  total = params + optimizer + activations + batch
  tokens = cfg.global_batch_size * cfg.seq_len
  flops = metrics.flops_per_token(cfg.model, cfg.seq_len) * tokens
  n = mesh.size
  from fmjax.training.state import param_count  # pylint: disable=import-outside-toplevel
  count = param_count(run.state.abstract.params)
  out = {
      'devices': n, 'mesh': dict(run.mesh.shape), 'params': count, 'slices': shd.slice_count(list(mesh.devices.flat))
      if math.prod(shd.dcn_sizes(cfg.mesh)) > 1 else 1,
      'active_params': count - metrics.inactive_params(cfg.model), 'param_bytes': params, 'optimizer_bytes': optimizer,
      'activation_bytes': activations, 'batch_bytes': batch, 'total_bytes': total,
      'flops_per_step': flops, 'compile_s': run.compile_seconds,
  }
  if out['slices'] > 1 and mesh.devices.flat[0].platform == 'tpu':
    from fmjax.perf import dcn_traffic  # pylint: disable=import-outside-toplevel
    out['dcn_bytes'] = dcn_traffic.summary(dcn_traffic.dcn_transfers(run.train_step.as_text()))
  if peak_flops:
    out['predicted_step_s'] = flops / n / (peak_flops * mfu)
    out['predicted_tokens_per_s'] = tokens / out['predicted_step_s']
  if memory_gib:
    out['memory_bytes'] = int(memory_gib * 2**30)
    out['fits'] = total <= out['memory_bytes']
  return out


def report(p: dict, mfu: float) -> str:
  gib = lambda b: f'{b / 2**30:,.3f} GiB'
  count = f'{p["params"] / 1e9:,.3f}B parameters' if 'params' in p else ''
  if count and p['active_params'] != p['params']:
    count += f', {p["active_params"] / 1e9:,.3f}B active per token (FLOPs count these)'
  slices = f'  over {p["slices"]} slices' if p.get('slices', 1) > 1 else ''
  lines = [f'devices: {p["devices"]}{slices}  mesh: {p["mesh"]}  (compiled in {p["compile_s"]:.1f}s)']
  lines += [f'model: {count}'] if count else []
  lines += ['per device:',
           f'  parameters        {gib(p["param_bytes"])}',
           f'  optimizer state   {gib(p["optimizer_bytes"])}',
           f'  activations       {gib(p["activation_bytes"])}  (XLA temporaries of the step)',
           f'  batch             {gib(p["batch_bytes"])}',
           f'  total             {gib(p["total_bytes"])}'
           + (f' of {gib(p["memory_bytes"])} ({"fits" if p["fits"] else "DOES NOT FIT"})' if 'memory_bytes' in p
              else ''),
           f'FLOPs per step: {p["flops_per_step"]:.3e}']
  if 'dcn_bytes' in p:
    sent = ', '.join(f'{kind.lower().replace("_", "-")} {gib(b)}' for kind, b in sorted(p['dcn_bytes'].items()))
    lines.append(f'across slices (DCN) per step and device: {sent or "nothing"}')
  if 'baseline_activation_bytes' in p:
    ratio = p['baseline_activation_bytes'] / max(p['activation_bytes'], 1)
    lines.append(f'without the context axis ({p["baseline_mesh"]}): activations {gib(p["baseline_activation_bytes"])} '
                 f'per device{" (does not fit)" if p.get("baseline_oom") else ""}: mesh.sequence cuts them {ratio:.2f}x')
  if 'predicted_step_s' in p:
    lines.append(f'predicted at {mfu:.0%} MFU: {p["predicted_step_s"] * 1e3:,.1f} ms/step, '
                 f'{p["predicted_tokens_per_s"]:,.0f} tokens/s')
  return '\n'.join(lines)


def has_tpu_chips() -> bool:
  """Whether this host has TPU chips (their device files), as opposed to compiling for TPUs from a CPU host."""
  import glob  # pylint: disable=import-outside-toplevel
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _use_devices(kind: str | None, chips: int) -> None:
  """Select the devices to compile for; must run before jax is imported."""
  if 'jax' in sys.modules:
    return
  if kind and kind.startswith('v'):
    try:
      import libtpu  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    except ImportError:
      pass
    else:
      if not has_tpu_chips():
        # Compile-only: no chip to guard, so another JAX process holding libtpu's lockfile must not
        # stop this one ("Internal error when accessing libtpu multi-process lockfile").
        os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
      return  # a real TPU topology is compiled against below
  os.environ['JAX_PLATFORMS'] = 'cpu'
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={chips}'.strip()


def run_command(args, overrides: Sequence[str]) -> int:
  """`python -m fmjax.plan` after its flags are parsed (fmjax/plan.py): compile, report, refuse what does not fit."""
  if args.topology and args.devices:
    raise PlanError('pass --topology or --devices, not both')
  from fmjax import config as config_lib  # no jax import: the device count is set below, before jax starts
  cfg = config_lib.resolve(cli.config_path(args.config), overrides)
  # Without --topology / --devices: the slice the config says it is sized for (config.topology).
  topology = args.topology or ('' if args.devices else cfg.get('topology', ''))
  kind, chips = parse_topology(topology) if topology else (None, args.devices or 0)
  if chips:
    _use_devices(kind, chips)  # before anything imports jax
  import jax
  from fmjax.perf import flops as metrics
  memory, peak = args.memory_gib or None, None
  if kind:
    memory = memory or metrics.ACCELERATORS[kind].hbm_gib
    peak = metrics.ACCELERATORS[kind].peak_flops
  if peak is None and jax.devices()[0].platform != 'cpu':
    peak = metrics.device_peak_flops(jax.devices()[0]) or None
  devices = None
  slices = int(args.num_slices or cfg.get('num_slices', 1) or 1)
  if slices > 1 and not (is_tpu(kind) and (jax.devices()[0].platform == 'tpu' or 'libtpu' in sys.modules)):
    raise PlanError(f'--num-slices {slices} needs a TPU --topology and libtpu (its multislice description); '
                    f'got {topology or "no topology"}')
  if is_tpu(kind) and (jax.devices()[0].platform == 'tpu' or 'libtpu' in sys.modules):
    devices = tpu_devices(topology, args.tpu_topology_name, slices)
  elif chips and chips != jax.device_count():
    raise PlanError(f'{chips} devices were asked for but {jax.device_count()} exist; run fmjax.plan in a fresh '
                    'process (it must set the device count before jax starts)')
  try:
    result = plan(cfg, memory, args.mfu, peak, devices, target=f'{slices} x {topology}' if slices > 1 else topology)
  except PlanError as e:
    if not str(e).startswith('does not fit'):
      raise
    raise PlanError(f'{e}; {suggest_batch(cfg, memory, devices)}') from None
  if args.context_baseline and int(cfg.mesh.get('sequence', 1)) > 1:
    result.update(context_baseline(cfg, devices))
  if topology:
    source = '--topology' if args.topology else 'config.topology: the slice this config is sized for'
    print(f'topology: {f"{slices} x " if slices > 1 else ""}{topology} ({source})')
  print(report(result, args.mfu))
  if result.get('fits') is False:
    raise PlanError(f'does not fit: needs {result["total_bytes"] / 2**30:.2f} GiB per device but the limit is '
                    f'{result["memory_bytes"] / 2**30:.2f} GiB; {suggest_batch(cfg, memory, devices)}')
  return 0


_NEEDED = re.compile(r'need ([\d.]+)([KMGT]?) but')


def context_baseline(cfg, devices=None) -> dict:
  """The same plan without the context axis (mesh.sequence folded into mesh.fsdp): its activation bytes per
  device (from XLA's refusal when they do not fit), to set beside the plan that shards the sequence.

  Without the axis a device holds whole rows, so the baseline takes the microbatches down until each holds
  one row per microbatch if the plan asks for less (a context axis is how a device holds part of a row)."""
  import jax  # pylint: disable=import-outside-toplevel
  from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
  n = int(cfg.mesh.get('sequence', 1))
  trial = cfg.copy_and_resolve_references()
  trial.mesh.sequence = 1
  if int(trial.mesh.fsdp) != -1:
    trial.mesh.fsdp = int(trial.mesh.fsdp) * n
  count = len(devices) if devices is not None else jax.device_count()
  sizes = dict(zip(shd.MESH_AXES, shd.mesh_shape(trial.mesh, count, num_slices=shd.slice_count(devices or [])
                                                 if math.prod(shd.dcn_sizes(trial.mesh)) > 1 else 1)))
  rows_per_step = sizes['data'] * sizes['fsdp'] * sizes['expert']
  while trial.microbatches > 1 and (trial.global_batch_size // trial.microbatches) % rows_per_step:
    trial.microbatches //= 2
  described = f'mesh.sequence=1 mesh.fsdp={trial.mesh.fsdp} microbatches={trial.microbatches}'
  try:
    result = plan(trial, devices=devices, target='the baseline without the context axis')
  except PlanError as e:
    m = _NEEDED.search(str(e))
    if not m:
      raise
    units = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
    return {'baseline_activation_bytes': int(float(m.group(1)) * units[m.group(2)]), 'baseline_mesh': described,
            'baseline_oom': True}
  return {'baseline_activation_bytes': result['activation_bytes'], 'baseline_mesh': described}


def suggest_batch(cfg, memory_gib: float | None, devices=None) -> str:
  """Advice naming the largest halved global batch that compiles and fits (or what else to change)."""
  batch = cfg.global_batch_size // 2
  while batch >= 1 and batch % cfg.microbatches == 0:
    trial = cfg.copy_and_resolve_references()
    trial.global_batch_size = batch
    try:
      result = plan(trial, memory_gib, devices=devices)
    except (PlanError, ValueError):
      result = None
    if result is not None and result.get('fits', True):
      return (f'--config.global_batch_size={batch} fits ({result["total_bytes"] / 2**30:.1f} GiB per device); '
              'or add devices / use remat to keep the batch')
    batch //= 2
  return 'no smaller batch fits: add devices, shard more (--config.mesh.*) or use remat (--config.model.remat=full)'
