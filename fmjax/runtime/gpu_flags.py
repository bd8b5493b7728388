"""XLA settings for training throughput on NVIDIA GPUs, set before JAX starts its backend.

`DEFAULT_FLAGS` are the flags MaxText's GPU recipes and NVIDIA JAX-Toolbox's GPU performance
guide set for LLM training: the latency-hiding scheduler (overlap collectives with compute), the
highest-priority stream for async collectives, large combine thresholds for all-reduce /
all-gather / reduce-scatter (fewer, larger NCCL calls), pipelined FSDP collectives and
double-buffered scan loops, cuBLAS rather than Triton for GEMMs, no CUDA-graph command buffers,
and no XLA rematerialisation pass (fmjax's `model.remat` decides what to recompute). Each name
exists in the installed jaxlib: XLA aborts on an unknown flag, and tests/test_attention_gpu.py
starts JAX with all of them. `XLA_PYTHON_CLIENT_MEM_FRACTION` (JAX's default 0.75) is raised to
`gpu_memory_fraction`.

Precedence, lowest first: fmjax's flags, config `gpu_extra_xla_flags`, the XLA_FLAGS already in
the environment (yours win, flag by flag). Off with `--config.gpu_xla_flags=false` or
`FMJAX_GPU_FLAGS=0`. On anything but an NVIDIA GPU nothing is set.

Entry points call `apply(cfg)` before anything starts the JAX backend; `python -m
fmjax.runtime.gpu_flags` prints the NAME=VALUE lines it would set on a GPU host (launch/slurm uses it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Mapping, MutableMapping

DEFAULT_FLAGS = (
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    '--xla_gpu_enable_highest_priority_async_stream=true',
    '--xla_gpu_all_reduce_combine_threshold_bytes=1073741824',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728',
    '--xla_gpu_enable_pipelined_all_gather=true',
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',
    '--xla_gpu_enable_all_gather_combine_by_dim=false',
    '--xla_gpu_enable_reduce_scatter_combine_by_dim=false',
    '--xla_gpu_enable_triton_gemm=false',
    '--xla_gpu_enable_command_buffer=',
    '--xla_disable_hlo_passes=rematerialization',
)
MEM_FRACTION = 'XLA_PYTHON_CLIENT_MEM_FRACTION'
OPT_OUT = 'FMJAX_GPU_FLAGS'
_CUDA_PLUGINS = ('jax_cuda13_plugin', 'jax_cuda12_plugin')

logger = logging.getLogger(__name__)


def _name(flag: str) -> str:
  return flag.split('=', 1)[0]


def merge_flags(*groups: str) -> str:
  """Space-separated XLA flag groups merged by flag name; a later group's value wins."""
  merged: dict[str, str] = {}
  for group in groups:
    for flag in group.split():
      merged.pop(_name(flag), None)
      merged[_name(flag)] = flag
  return ' '.join(merged.values())


def detect_platform(env: Mapping[str, str]) -> str:
  """'gpu' when JAX will run on NVIDIA GPUs, judged without starting JAX (JAX_PLATFORMS, else a
  CUDA plugin installed and an NVIDIA device node present); otherwise the named or 'cpu'."""
  platforms = env.get('JAX_PLATFORMS', '') or env.get('JAX_PLATFORM_NAME', '')
  if platforms:
    first = platforms.split(',')[0].strip().lower()
    return 'gpu' if first in ('cuda', 'gpu') else first
  plugin = any(importlib.util.find_spec(p) is not None for p in _CUDA_PLUGINS)
  return 'gpu' if plugin and os.path.exists('/dev/nvidiactl') else 'cpu'


def gpu_environment(env: Mapping[str, str], platform: str, *, enabled: bool = True, extra: str = '',
                    memory_fraction: float = 0.9) -> dict[str, str]:
  """The environment variables to set (a pure function; {} when not on a GPU or turned off)."""
  if platform != 'gpu' or not enabled or env.get(OPT_OUT, '1') == '0':
    return {}
  updates = {'XLA_FLAGS': merge_flags(' '.join(DEFAULT_FLAGS), extra, env.get('XLA_FLAGS', ''))}
  if memory_fraction and MEM_FRACTION not in env:
    updates[MEM_FRACTION] = f'{memory_fraction:g}'
  return updates


def _backend_started() -> bool:
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(bridge and bridge.backends_are_initialized())


def apply(cfg=None, env: MutableMapping[str, str] | None = None, platform: str | None = None) -> dict[str, str]:
  """Set the GPU XLA environment for this process (call before JAX starts its backend); logs it.

  `cfg` (optional) supplies gpu_xla_flags / gpu_extra_xla_flags / gpu_memory_fraction.
  Returns what was set.
  """
  env = os.environ if env is None else env
  platform = platform or detect_platform(env)
  options = {} if cfg is None else dict(enabled=cfg.gpu_xla_flags, extra=cfg.gpu_extra_xla_flags,
                                        memory_fraction=cfg.gpu_memory_fraction)
  updates = gpu_environment(env, platform, **options)
  if updates and env is os.environ and _backend_started():
    logger.warning('gpu flags set after the JAX backend started: they take effect in new processes only')
  env.update(updates)
  if updates:
    logger.info('gpu: %s', ' '.join(f'{k}={v}' for k, v in updates.items()))
  return updates


def main(argv: list[str] | None = None) -> int:
  """`python -m fmjax.runtime.gpu_flags [--platform P]`: print the NAME=VALUE lines `apply` would set."""
  argv = sys.argv[1:] if argv is None else argv
  platform = argv[1] if argv[:1] == ['--platform'] and len(argv) == 2 else None
  if argv and platform is None:
    print('usage: python -m fmjax.runtime.gpu_flags [--platform gpu|cpu]', file=sys.stderr)
    return 2
  for name, value in gpu_environment(os.environ, platform or detect_platform(os.environ)).items():
    print(f'{name}={value}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
