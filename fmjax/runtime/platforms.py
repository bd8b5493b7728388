"""Which JAX platforms a command uses: chosen before JAX starts, so libtpu is loaded only on TPU hosts.

With libtpu installed (the `tpu` extra) and JAX_PLATFORMS unset, JAX tries its TPU backend on every
machine; off a TPU host libtpu then prints lines of errors ("Failed to find host bounds for
accelerator type", "unexpected worker hostname ...") before falling back to the CPU. `choose()` sets
JAX_PLATFORMS to the platforms this machine has ('cuda,cpu' with a visible NVIDIA GPU and JAX's CUDA
plugin, else 'cpu') unless:
  - the user set JAX_PLATFORMS (or the older JAX_PLATFORM_NAME): theirs always wins;
  - this may be a TPU host: TPU device files (/dev/accel*, /dev/vfio/<n>), a TPU PCI device (what
    JAX itself checks), or the TPU VM / GKE environment libtpu reads (TPU_WORKER_HOSTNAMES, ...);
  - a PJRT plugin other than CUDA/ROCm is installed (its platform is left to JAX to find).
Compile-only TPU programs (fmjax.plan --topology v5p-8) still work: they load libtpu for a topology
(jax.experimental.topologies), whatever JAX_PLATFORMS says.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Iterable, Mapping, MutableMapping

# Set on TPU VMs and GKE TPU pods, read by libtpu / JAX's TPU cluster detection.
TPU_ENVIRONMENT = ('TPU_NAME', 'TPU_WORKER_HOSTNAMES', 'TPU_WORKER_ID', 'TPU_ACCELERATOR_TYPE',
                   'TPU_HOST_BOUNDS', 'TPU_CHIPS_PER_HOST_BOUNDS', 'TPU_PROCESS_BOUNDS', 'TPU_PROCESS_ADDRESSES',
                   'TPU_TOPOLOGY', 'TPU_VISIBLE_CHIPS', 'TPU_VISIBLE_DEVICES', 'CLOUD_TPU_TASK_ID',
                   'CLOUD_TPU_ACCELERATOR_TYPE', 'MEGASCALE_COORDINATOR_ADDRESS', 'JAX_FORCE_TPU_INIT')
TPU_DEVICE_FILES = ('dev/accel[0-9]*', 'dev/vfio/[0-9]*')
# PCI ids of TPU chips (jax/_src/hardware_utils.py); other Google PCI devices (gVNIC, NVMe) are not TPUs.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')
_NVIDIA_DEVICE_FILES = ('dev/nvidia0', 'dev/nvidiactl', 'dev/dxg')   # as JAX checks (dxg: WSL2)
_AMD_DEVICE_FILES = ('dev/kfd', 'dev/dxg')
USER_SETTINGS = ('JAX_PLATFORMS', 'JAX_PLATFORM_NAME')


def _read(path: str) -> str:
  try:
    with open(path, encoding='ascii') as f:
      return f.read().strip()
  except (OSError, UnicodeDecodeError):
    return ''


def tpu_pci_devices(root: str = '/') -> int:
  """How many TPU chips are attached through PCI (under `root`, '/' on a real machine)."""
  count = 0
  for vendor in glob.glob(os.path.join(root, 'sys/bus/pci/devices/*/vendor')):
    device = _read(os.path.join(os.path.dirname(vendor), 'device'))
    count += _read(vendor) == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES
  return count


def tpu_host_evidence(environ: Mapping[str, str] = os.environ, root: str = '/') -> str:
  """Why this may be a TPU host ('' when nothing says so): a device file, a PCI device or an env variable."""
  for pattern in TPU_DEVICE_FILES:
    found = sorted(glob.glob(os.path.join(root, pattern)))
    if found:
      return found[0]
  if tpu_pci_devices(root):
    return 'a TPU PCI device'
  for name in TPU_ENVIRONMENT:
    if environ.get(name):
      return name
  return ''


def installed_plugins() -> list[str]:
  """Names of the installed JAX PJRT plugins (jax_plugins.* modules and 'jax_plugins' entry points)."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pkgutil  # pylint: disable=import-outside-toplevel
  names = set()
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    names.update(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
  names.update(e.name for e in importlib.metadata.entry_points(group='jax_plugins'))
  return sorted(names)


def available(root: str = '/', plugins: Iterable[str] | None = None) -> str | None:
  """The JAX_PLATFORMS of a non-TPU machine: 'cuda,cpu', 'rocm,cpu' or 'cpu'; None when a plugin of
  another kind is installed (then JAX must look for itself)."""
  plugins = installed_plugins() if plugins is None else list(plugins)
  exists = lambda files: any(os.path.exists(os.path.join(root, f)) for f in files)
  platforms = []
  for plugin in plugins:
    kind = 'cuda' if 'cuda' in plugin else 'rocm' if 'rocm' in plugin else None
    if kind is None:
      return None
    if kind not in platforms and exists(_NVIDIA_DEVICE_FILES if kind == 'cuda' else _AMD_DEVICE_FILES):
      platforms.append(kind)
  return ','.join(platforms + ['cpu'])


def choice(environ: Mapping[str, str] = os.environ, root: str = '/',
           plugins: Iterable[str] | None = None) -> str | None:
  """The JAX_PLATFORMS to set, or None to leave JAX's own choice (user setting, TPU host, unknown plugin)."""
  if any(name in environ for name in USER_SETTINGS) or tpu_host_evidence(environ, root):
    return None
  return available(root, plugins)


def choose(environ: MutableMapping[str, str] | None = None, root: str = '/',
           plugins: Iterable[str] | None = None) -> str | None:
  """Set JAX_PLATFORMS per `choice` before JAX starts; returns what was set (None: nothing).

  Call it before anything imports jax. If jax is imported already but has no backend yet, its
  `jax_platforms` option is set instead (unless someone set that); once a backend exists, nothing changes.
  """
  environ = os.environ if environ is None else environ
  platforms = choice(environ, root, plugins)
  if platforms is None:
    return None
  jax = sys.modules.get('jax')
  if jax is None:
    environ['JAX_PLATFORMS'] = platforms
    return platforms
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return None
  if started or jax.config.jax_platforms:
    return None
  jax.config.update('jax_platforms', platforms)
  return platforms
