"""Where shardings are decided: the mesh from config, logical-axis rules, and their checks.

Model code names logical axes only; `logical_axis_rules` (config data) maps them onto the mesh
axes. The mesh axes and their device order are the `mesh` section of the schema (fmjax/config/schema.py:
data, fsdp, expert, tensor); a mesh config may leave axes out (size 1).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax.errors import UserError

from fmjax.config.schema import MESH as _MESH_SCHEMA

MESH_AXES = tuple(_MESH_SCHEMA)   # in device order: the last varies fastest (tensor: the closest devices)
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
  names = list(mesh_cfg.keys())
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise MeshError(f'mesh axis {unknown[0]!r} is unknown; the mesh axes are {", ".join(MESH_AXES)}')
  return [int(mesh_cfg[a]) if a in names else 1 for a in MESH_AXES]


def mesh_shape(mesh_cfg, num_devices: int, platform: str = '') -> tuple[int, ...]:
  """Resolve the configured shape, one size per axis of MESH_AXES; one -1 takes the remaining devices.

  `platform` (e.g. 'cpu') names the devices in the error of a mesh that does not fit them."""
  dims = _sizes(mesh_cfg)
  named = _named(zip(MESH_AXES, dims))
  have = f'{num_devices} {"is" if num_devices == 1 else "are"} available' + (f' ({platform})' if platform else '')
  free = [i for i, d in enumerate(dims) if d == -1]
  if len(free) > 1:
    raise MeshError(f'mesh {named}: at most one axis may be -1')
  if any(d == 0 or d < -1 for d in dims):
    raise MeshError(f'mesh {named}: axis sizes must be positive or -1')
  fixed = math.prod(d for d in dims if d != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f'mesh {named} needs a multiple of {fixed} devices but {have}; set --config.mesh.data/fsdp/'
                      f'tensor so the product of the fixed sizes divides {num_devices}'
                      + _too_few_devices_hint(fixed, num_devices, platform))
    dims[free[0]] = num_devices // fixed
  needed = math.prod(dims)
  if needed != num_devices:
    raise MeshError(f'mesh {named} needs {needed} devices but {have}; set --config.mesh.* so the product is '
                    f'{num_devices}' + _too_few_devices_hint(needed, num_devices, platform))
  return tuple(dims)


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
  """A Mesh over all (or the given) devices with GSPMD-style (Auto) axes."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices), devices[0].platform if devices else '')
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
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
  """'data=2 fsdp=2 tensor=2 (8 devices, cpu)'."""
  return f'{_named(mesh.shape.items())} ({mesh.size} devices, {mesh.devices.flat[0].platform})'


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on this mesh."""
  return NamedSharding(mesh, PartitionSpec())
