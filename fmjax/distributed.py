"""Multi-process start-up: `jax.distributed.initialize` when needed, and topology checks.

A run is multi-process when FMJAX_COORDINATOR / FMJAX_NUM_PROCESSES / FMJAX_PROCESS_ID are set
(the launchers in `launch/` set them), under SLURM with several tasks, or on a multi-host TPU VM.
FMJAX_NUM_CPU_DEVICES sets the CPU device count per process (multi-process tests on CPU).
"""

from __future__ import annotations

import os
import sys
import threading

import jax

from fmjax.errors import UserError


class TopologyError(UserError, RuntimeError):
  """The processes or devices are not what the run expects."""


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise TopologyError(f'{name}={value!r} must be an integer') from None


def _join_timeout(pid: int, num: int, coordinator: str, timeout: int) -> None:
  print(f'fmjax: error: process {pid} of {num} could not form the run at {coordinator} within {timeout}s; '
        f'check that all {num} processes were started with the same FMJAX_COORDINATOR and '
        'FMJAX_NUM_PROCESSES', file=sys.stderr, flush=True)
  os._exit(2)


def initialize() -> None:
  """Start JAX's multi-controller runtime if this process is part of a multi-process run."""
  cpu_devices = _env_int('FMJAX_NUM_CPU_DEVICES')
  if cpu_devices:
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  coordinator = os.environ.get('FMJAX_COORDINATOR')
  num = _env_int('FMJAX_NUM_PROCESSES')
  pid = _env_int('FMJAX_PROCESS_ID')
  timeout = _env_int('FMJAX_INIT_TIMEOUT') or 300
  if coordinator or num or pid is not None:
    if not (coordinator and num and pid is not None):
      raise TopologyError('set all of FMJAX_COORDINATOR (host:port), FMJAX_NUM_PROCESSES and FMJAX_PROCESS_ID, '
                          'or none of them')
    if not 0 <= pid < num:
      raise TopologyError(f'FMJAX_PROCESS_ID={pid} must be in [0, FMJAX_NUM_PROCESSES={num})')
    if num == 1:
      return
    print(f'fmjax: process {pid} of {num} joining the coordinator at {coordinator} (timeout {timeout}s)',
          file=sys.stderr, flush=True)
    # JAX aborts the process with a stack trace when the coordinator is not reached in time; a
    # watchdog that fires first turns that into one line naming what to check.
    watchdog = threading.Timer(timeout, _join_timeout, (pid, num, coordinator, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
      jax.distributed.initialize(coordinator, num_processes=num, process_id=pid,
                                 initialization_timeout=timeout + 30)
    finally:
      watchdog.cancel()
    return
  slurm_tasks = _env_int('SLURM_NTASKS')
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if (slurm_tasks and slurm_tasks > 1) or len([h for h in tpu_hosts.split(',') if h]) > 1:
    jax.distributed.initialize()  # JAX detects the SLURM / TPU VM cluster itself


def describe() -> str:
  """'process 0/2, 4 local / 8 global devices (cpu)'."""
  return (f'process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / '
          f'{jax.device_count()} global devices ({jax.devices()[0].platform})')


def check_devices(expected_devices: int | None = None) -> None:
  """Every process must see the same number of local devices; the total must match when stated."""
  counts = {d.process_index for d in jax.devices()}
  per_process = [sum(1 for d in jax.devices() if d.process_index == p) for p in sorted(counts)]
  if len(set(per_process)) > 1:
    raise TopologyError(f'processes see different local device counts {per_process}; every host must '
                        'expose the same number of devices')
  if expected_devices is not None and jax.device_count() != expected_devices:
    raise TopologyError(f'the mesh expects {expected_devices} devices but {jax.device_count()} are visible '
                        f'({describe()})')


def is_leader() -> bool:
  """True on the process that writes logs and files (process 0)."""
  return jax.process_index() == 0
