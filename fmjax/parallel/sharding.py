"""Where shardings are decided: the mesh from config, logical-axis rules, and their checks.

Model code names logical axes only; `logical_axis_rules` (config data) maps them onto the mesh
axes. The mesh axes and their device order are the `mesh` section of the schema (fmjax/config/schema.py:
data, fsdp, expert, sequence, tensor); a mesh config may leave axes out (size 1). `mesh.dcn.*` sizes the
axes that also span slices (TPU multislice, or nodes): the mesh is then JAX's hybrid device mesh, each
axis its per-slice size times its size across slices.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax.errors import UserError

from fmjax.config.schema import MESH as _MESH_SCHEMA

MESH_AXES = tuple(a for a in _MESH_SCHEMA if a != 'dcn')   # in device order: the last varies fastest (tensor)
DCN_AXES = tuple(_MESH_SCHEMA['dcn'])   # the axes that may also span slices (mesh.dcn.*)
_ALWAYS_NAMED = ('data', 'fsdp', 'tensor')   # messages name the other axes only when they are not 1


def _named(sizes) -> str:
  """'data=1 fsdp=-1 expert=4 tensor=1': the axes and their sizes, an extra axis only when not 1."""
  return ' '.join(f'{a}={d}' for a, d in sizes if a in _ALWAYS_NAMED or d != 1)


class MeshError(UserError):
  """The mesh does not fit the devices or the model."""


def _too_few_devices_hint(needed: int, available: int, platform: str) -> str:
  """How to get `needed` devices where there are fewer: fake CPU devices, or a bigger machine."""
  if available >= needed:
    return ''
  if platform == 'cpu':
    return f'; to try this mesh on CPU, run with XLA_FLAGS=--xla_force_host_platform_device_count={needed}'
  return f'; or run on a machine (or slice) with {needed} devices'


def _sizes(mesh_cfg) -> list[int]:
  """The configured size of every mesh axis (an axis the config leaves out: 1); an unknown axis is refused."""
  names = [n for n in mesh_cfg.keys() if n != 'dcn']
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise MeshError(f'mesh axis {unknown[0]!r} is unknown; the mesh axes are {", ".join(MESH_AXES)}')
  return [int(mesh_cfg[a]) if a in names else 1 for a in MESH_AXES]


def dcn_sizes(mesh_cfg) -> list[int]:
  """The size of every mesh axis across slices (mesh.dcn.*; 1 where absent), one per MESH_AXES."""
  dcn = mesh_cfg.get('dcn') if hasattr(mesh_cfg, 'get') else None
  dcn = dict(dcn or {})
  unknown = [n for n in dcn if n not in DCN_AXES]
  if unknown:
    raise MeshError(f'mesh.dcn.{unknown[0]} is not an axis that can span slices; use mesh.dcn.'
                    f'{" or mesh.dcn.".join(DCN_AXES)}')
  sizes = [int(dcn.get(a, 1)) for a in MESH_AXES]
  bad = [(a, d) for a, d in zip(MESH_AXES, sizes) if d < 1]
  if bad:
    raise MeshError(f'mesh.dcn.{bad[0][0]}={bad[0][1]}: sizes across slices must be positive (1 = within a slice)')
  return sizes


def slice_count(devices: Sequence[jax.Device]) -> int:
  """How many slices the devices form: TPU slices (`slice_index`, multislice), else processes (GPU or CPU
  nodes, one granule each)."""
  if not devices:
    return 1
  if hasattr(devices[0], 'slice_index'):
    return len({d.slice_index for d in devices})
  return len({d.process_index for d in devices})


def mesh_shape(mesh_cfg, num_devices: int, platform: str = '', num_slices: int = 1) -> tuple[int, ...]:
  """Resolve the configured shape, one size per axis of MESH_AXES; one -1 takes the remaining devices.

  The sizes are per slice times mesh.dcn.* across `num_slices` slices (the result is their product).
  `platform` (e.g. 'cpu') names the devices in the error of a mesh that does not fit them."""
  ici, dcn = mesh_shapes(mesh_cfg, num_devices, platform, num_slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def mesh_shapes(mesh_cfg, num_devices: int, platform: str = '', num_slices: int = 1):
  """(per-slice sizes, across-slice sizes), one per MESH_AXES; see `mesh_shape`. One-line errors name the axis."""
  dims = _sizes(mesh_cfg)
  dcn = dcn_sizes(mesh_cfg)
  across = math.prod(dcn)
  spans = ' '.join(f'mesh.dcn.{a}={d}' for a, d in zip(MESH_AXES, dcn) if d != 1)
  if across > 1 and num_slices == 1:
    raise MeshError(f'{spans} spans {across} slices but the {num_devices} devices form one slice'
                    + (f' ({platform})' if platform else '') + '; set mesh.dcn.* to 1, or run on '
                    f'{across} slices (TPU multislice) or {across} processes (one per GPU/CPU node)')
  if num_slices > 1 and across != num_slices:
    raise MeshError(f'the devices form {num_slices} slices but mesh.dcn.* spans {across}'
                    + (f' ({spans})' if spans else '') + f'; set mesh.dcn.data (or mesh.dcn.fsdp) so the product '
                    f'is {num_slices}')
  if num_devices % num_slices:
    raise MeshError(f'{num_devices} devices do not split evenly into {num_slices} slices')
  per_slice = num_devices // num_slices
  named = _named(zip(MESH_AXES, dims))
  where = ' per slice' if num_slices > 1 else ''
  have = f'{per_slice} {"is" if per_slice == 1 else "are"} available{where}' + (f' ({platform})' if platform else '')
  free = [i for i, d in enumerate(dims) if d == -1]
  if len(free) > 1:
    raise MeshError(f'mesh {named}: at most one axis may be -1')
  if any(d == 0 or d < -1 for d in dims):
    bad = next(a for a, d in zip(MESH_AXES, dims) if d == 0 or d < -1)
    raise MeshError(f'mesh {named}: axis sizes must be positive or -1 (mesh.{bad})')
  fixed = math.prod(d for d in dims if d != -1)
  if free:
    if per_slice % fixed:
      raise MeshError(f'mesh {named} needs a multiple of {fixed} devices{where} but {have}; set '
                      f'--config.mesh.{_culprit(dims, per_slice)} so the product of the fixed sizes divides '
                      f'{per_slice}' + _too_few_devices_hint(fixed, per_slice, platform))
    dims[free[0]] = per_slice // fixed
  needed = math.prod(dims)
  if needed != per_slice:
    raise MeshError(f'mesh {named} needs {needed} devices{where} but {have}; set --config.mesh.'
                    f'{_culprit(dims, per_slice)} so the product is {per_slice}'
                    + _too_few_devices_hint(needed, per_slice, platform))
  return tuple(dims), tuple(dcn)


def _culprit(dims, devices: int) -> str:
  """The axis to change: the largest one whose size does not divide the devices, else the largest above 1."""
  sized = [(d, a) for a, d in zip(MESH_AXES, dims) if d > 1]
  odd = [(d, a) for d, a in sized if devices % d]
  pick = max(odd or sized or [(1, 'fsdp')])
  return pick[1]


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Mesh text -> axis sizes, -1 as in config: 'data,fsdp,tensor' sizes (e.g. '1,-1,1') or named sizes
  ('expert=4,data=2'; the axes left out are 1)."""
  usage = (f'--mesh {spec!r} must be three sizes data,fsdp,tensor (e.g. 1,-1,1) or named sizes of '
           f'{",".join(MESH_AXES)} (e.g. expert=4,fsdp=-1), each positive or one of them -1 (the remaining devices)')
  parts = [p.strip() for p in spec.split(',')]
  try:
    if all('=' in p for p in parts):
      named = {k.strip(): int(v) for k, v in (p.split('=', 1) for p in parts)}
      if any(k not in MESH_AXES for k in named):
        raise ValueError
      sizes = {a: named.get(a, 1) for a in MESH_AXES}
    else:
      dims = [int(p) for p in parts]
      if len(dims) != 3:
        raise ValueError
      sizes = dict(zip(MESH_AXES, [1] * len(MESH_AXES)), **dict(zip(('data', 'fsdp', 'tensor'), dims)))
  except ValueError:
    raise MeshError(usage) from None
  dims = list(sizes.values())
  if any(d == 0 or d < -1 for d in dims) or dims.count(-1) > 1:
    raise MeshError(usage)
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over all (or the given) devices with GSPMD-style (Auto) axes.

  With mesh.dcn.* above 1 the devices must form that many slices (TPU multislice, or processes elsewhere):
  a hybrid mesh, each axis the per-slice (ICI) size times its size across slices, slices outermost."""
  devices = list(jax.devices() if devices is None else devices)
  platform = devices[0].platform if devices else ''
  slices = slice_count(devices)   # TPU slices always count: a mesh over 2 slices must say which axes cross
  tpu_slices = bool(devices) and hasattr(devices[0], 'slice_index')
  ici, dcn = mesh_shapes(mesh_cfg, len(devices), platform,
                         slices if tpu_slices or math.prod(dcn_sizes(mesh_cfg)) > 1 else 1)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) > 1:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not hasattr(
        devices[0], 'slice_index'), allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=auto)
  shape = tuple(ici)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except Exception:  # topology-aware placement can refuse odd shapes; fall back to device order
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def axis_rules(cfg) -> tuple:
  """The logical-axis rules of a run config as a tuple of (name, mesh axes) pairs."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in cfg.logical_axis_rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules) -> None:
  """Context for tracing model code: the mesh and the logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_shardings(logical_specs, mesh: Mesh, rules):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a (batch, length, ...) input array."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


@functools.lru_cache(maxsize=64)
def batch_feed(sharding: NamedSharding) -> tuple[int, int]:
  """(index, count): this process feeds part `index` of the `count` equal parts of the global batch that
  processes feed. Processes whose devices hold the same rows (an axis that does not split the batch, e.g.
  mesh.sequence or mesh.tensor, spanning processes) feed the same part; otherwise it is (process_index,
  process_count)."""
  mesh, spec = sharding.mesh, sharding.spec
  axes = spec[0] if len(spec) else None
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  names = list(mesh.axis_names)
  rows: dict[int, set] = {}
  for idx in np.ndindex(mesh.devices.shape):
    shard = 0
    for a in axes:
      shard = shard * mesh.shape[a] + idx[names.index(a)]
    rows.setdefault(mesh.devices[idx].process_index, set()).add(shard)
  parts = sorted({tuple(sorted(v)) for v in rows.values()})
  if len(parts) == len(rows):
    return jax.process_index(), jax.process_count()
  return parts.index(tuple(sorted(rows[jax.process_index()]))), len(parts)


def check_divisible(abstract_tree, shardings, what: str = 'parameter') -> None:
  """Every sharded dimension must divide by its mesh axes; else one line naming the culprit."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  for (path, leaf), sharding in zip(leaves, specs):
    mesh = sharding.mesh
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        raise MeshError(f'{what} {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: dimension {dim} '
                        f'is not divisible by mesh axes {axes} of size {size}; change the model size or '
                        '--config.mesh.*')


def describe(mesh: Mesh) -> str:
  """'data=2 fsdp=2 tensor=2 (8 devices, cpu)'; '... (8 devices in 2 slices, tpu)' for multislice."""
  devices = list(mesh.devices.flat)
  slices = len({d.slice_index for d in devices}) if hasattr(devices[0], 'slice_index') else 1
  over = f' in {slices} slices' if slices > 1 else ''
  return f'{_named(mesh.shape.items())} ({mesh.size} devices{over}, {devices[0].platform})'


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on this mesh."""
  return NamedSharding(mesh, PartitionSpec())
