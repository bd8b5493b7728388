"""Multi-process start-up: `jax.distributed.initialize` when needed, and topology checks.

A run is multi-process when FMJAX_COORDINATOR / FMJAX_NUM_PROCESSES / FMJAX_PROCESS_ID are set
(the launchers in `launch/` set them), or when JAX's own cluster detection finds an environment
of several processes: a multi-host Cloud TPU VM slice (TPU metadata server), GKE TPU pods
(TPU_WORKER_HOSTNAMES), SLURM with several tasks, Open MPI. FMJAX_NUM_CPU_DEVICES sets the CPU
device count per process (multi-process tests on CPU).

Every process of a run sends heartbeats to the coordinator. When one dies (crash, SIGKILL, lost
host) the others stop within FMJAX_HEARTBEAT_TIMEOUT seconds (default 30) with one line and exit
2 instead of hanging in a collective; SIGTERM in any process is turned into a checkpoint at one
common step by JAX's preemption sync manager (see `loop.PreemptionWatch`).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax

from fmjax.errors import UserError

DEFAULT_HEARTBEAT_TIMEOUT = 30


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


def _join_timeout(who: str, num: int, coordinator: str, timeout: int, hint: str) -> None:
  print(f'fmjax: error: {who} of {num} could not form the run at {coordinator} within {timeout}s; {hint}',
        file=sys.stderr, flush=True)
  os._exit(2)


def _first_line(text: str, limit: int = 160) -> str:
  return ' '.join(str(text).split())[:limit]


def peer_lost_message(detail: str) -> str:
  """The one line a surviving process prints when another process of the run is gone."""
  where = 'this process'
  if jax.distributed.is_initialized():
    where = f'process {jax.process_index()} of {jax.process_count()}'
  return (f'fmjax: error: {where}: another process of the run stopped (crashed, killed or its host was lost) '
          f'[{_first_line(detail)}]; stopping every process: restart all of them to resume from the last checkpoint')


def _peer_lost(detail: str) -> None:
  """Another process is gone: one line, exit 2 (no traceback, no wait for a shutdown barrier)."""
  print(peer_lost_message(detail), file=sys.stderr, flush=True)
  os._exit(2)


_PEER_ERRORS = ('Gloo', 'Connection reset', 'Connection refused', 'heartbeat', 'UNAVAILABLE', 'DEADLINE_EXCEEDED')


def _excepthook(previous):
  """Uncaught errors in a multi-process run: a collective that failed because a peer died (gloo on
  CPU/GPU reports it at once) is one line and exit 2, not a traceback and a wait at the shutdown barrier."""
  def hook(kind, value, tb):
    if isinstance(value, jax.errors.JaxRuntimeError) and any(s in str(value) for s in _PEER_ERRORS):
      _peer_lost(str(value).splitlines()[0] if str(value) else kind.__name__)
    previous(kind, value, tb)
  return hook


class PeerWatch:
  """Liveness of the other processes through the coordinator's key-value store.

  Every `timeout / 5` seconds each process bumps its counter under fmjax/alive/ and reads the
  others'. A peer whose counter has not moved for `timeout` seconds (killed, frozen, host lost), or
  a coordinator that has not answered for `timeout` seconds, stops this process with one line: a
  collective on TPU would otherwise wait for the dead peer until JAX's own (fatal, multi-line)
  heartbeat timeout. A process that exits normally marks itself done first.
  """

  PREFIX = 'fmjax/alive/'

  def __init__(self, client, process: int, processes: int, timeout: float):
    self.client, self.process, self.processes, self.timeout = client, process, processes, timeout
    self.interval = max(timeout / 5, 0.2)
    self._stopped = threading.Event()
    self._answered = time.monotonic()
    self._unreachable = 'no reply'
    self._seen: dict[str, tuple[str, float]] = {}   # peer -> (counter, when it last changed)

  def start(self) -> 'PeerWatch':
    for target in (self._beat, self._check_coordinator):
      threading.Thread(target=target, name=f'fmjax-{target.__name__[1:]}', daemon=True).start()
    atexit.register(self.stop)   # runs before JAX's own atexit shutdown
    return self

  def stop(self) -> None:
    """Stop watching and tell the others this process finished on purpose."""
    if self._stopped.is_set():
      return
    self._stopped.set()
    try:
      self.client.key_value_set(f'{self.PREFIX}{self.process}', 'done', allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the coordinator may be gone already; nothing to tell then
      pass

  def _beat(self) -> None:
    count = 0
    while not self._stopped.wait(self.interval if count else 0):
      count += 1
      try:
        self.client.key_value_set(f'{self.PREFIX}{self.process}', str(count), allow_overwrite=True)
        peers = dict(self.client.key_value_dir_get(self.PREFIX))
      except Exception as e:  # noqa: BLE001 - the coordinator is unreachable: _check_coordinator decides
        if self._stopped.is_set():
          return
        self._unreachable = _first_line(e)
        continue
      self._answered = time.monotonic()
      self._check_peers(peers)

  def _check_peers(self, peers: dict) -> None:
    now = time.monotonic()
    for key, value in peers.items():
      peer = key.rsplit('/', 1)[-1]
      if peer == str(self.process) or value == 'done':
        continue
      last = self._seen.get(peer)
      if last is None or last[0] != value:
        self._seen[peer] = (value, now)
      elif now - last[1] > self.timeout and not self._stopped.is_set():
        _peer_lost(f'process {peer} sent no heartbeat for {self.timeout:g}s')

  def _check_coordinator(self) -> None:
    while not self._stopped.wait(self.interval):
      if time.monotonic() - self._answered > self.timeout and not self._stopped.is_set():
        _peer_lost(f'the coordinator (process 0) did not answer for {self.timeout:g}s: '
                   f'{self._unreachable}')


def _start(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)`, then the peer watch and the one-line collective errors."""
  timeout = _env_int('FMJAX_HEARTBEAT_TIMEOUT') or DEFAULT_HEARTBEAT_TIMEOUT
  # JAX's own heartbeat timeout stays well above ours: when it fires it aborts with a stack trace.
  jax.distributed.initialize(heartbeat_timeout_seconds=max(100, 4 * timeout), **kwargs)
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  PeerWatch(jax_distributed.global_state.client, jax.process_index(), jax.process_count(), timeout).start()
  sys.excepthook = _excepthook(sys.excepthook)


def detect_cluster() -> tuple[str, int] | None:
  """(name, process count) of the multi-process environment JAX's cluster detection finds, else None.

  Uses JAX's own detectors (jax/_src/clusters): a Cloud TPU VM slice through the metadata server,
  GKE TPU pods, SLURM, Open MPI; opt-in-only ones (mpi4py) are skipped as JAX skips them."""
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method:
      continue
    try:
      if not env.is_env_present():
        continue
      count = env.get_process_count()
    except Exception:  # noqa: BLE001 - a detector that cannot tell (no metadata server, ...) finds nothing
      continue
    return (env.name, count) if count and count > 1 else None
  return None


def initialize() -> None:
  """Start JAX's multi-controller runtime if this process is part of a multi-process run."""
  cpu_devices = _env_int('FMJAX_NUM_CPU_DEVICES')
  if cpu_devices:
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if jax.distributed.is_initialized():
    return
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
    _join(f'process {pid}', num, coordinator, timeout,
          f'check that all {num} processes were started with the same FMJAX_COORDINATOR and FMJAX_NUM_PROCESSES',
          coordinator_address=coordinator, num_processes=num, process_id=pid)
    return
  found = detect_cluster()
  if found:
    name, num = found
    _join('this process', num, f'the {name} coordinator', timeout,   # JAX detects the rest itself
          f'check that all {num} workers run the command (launch/tpu/run.sh starts one per worker)')


def _join(who: str, num: int, coordinator: str, timeout: int, hint: str, **kwargs) -> None:
  """Join the run, with a watchdog that turns a coordinator that never answers into one line."""
  print(f'fmjax: {who} of {num} joining {coordinator} (timeout {timeout}s)', file=sys.stderr, flush=True)
  # JAX aborts the process with a stack trace when the coordinator is not reached in time; a
  # watchdog that fires first turns that into one line naming what to check.
  watchdog = threading.Timer(timeout, _join_timeout, (who, num, coordinator, timeout, hint))
  watchdog.daemon = True
  watchdog.start()
  try:
    _start(initialization_timeout=timeout + 30, **kwargs)
  finally:
    watchdog.cancel()


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
