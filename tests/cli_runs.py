"""Running `python -m fmjax.train` in subprocesses: environments, multi-process launches, metrics readers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def base_env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env.update(JAX_PLATFORMS='cpu', FMJAX_NUM_CPU_DEVICES=str(devices), PYTHONUNBUFFERED='1')
  env.update({k: str(v) for k, v in extra.items()})
  return env


def command(workdir, data, *overrides):
  return [sys.executable, '-m', 'fmjax.train', '--config', TINY, '--workdir', str(workdir),
          f'--config.data.files={data["files"]}', f'--config.data.cache_dir={data["cache"]}', *overrides]


def train_cli(workdir, data, *overrides, processes=1, devices=8, timeout=240, env=None):
  """Run the CLI in `processes` processes (localhost coordinator); return their exit codes."""
  if processes == 1:
    procs = [subprocess.Popen(command(workdir, data, *overrides), env=base_env(devices, **(env or {})),
                              cwd=ROOT)]
  else:
    port = free_port()
    procs = [subprocess.Popen(command(workdir, data, *overrides), cwd=ROOT, env=base_env(
        devices, FMJAX_COORDINATOR=f'127.0.0.1:{port}', FMJAX_NUM_PROCESSES=processes, FMJAX_PROCESS_ID=i))
        for i in range(processes)]
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def logged_losses(workdir) -> dict:
  """{step: loss} from metrics.jsonl; a step logged twice (after a resume) keeps the last value."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if rec['split'] == 'train':
        out[rec['step']] = rec['loss']
  return out


def train_records(workdir) -> list[tuple[int, float]]:
  """(step, loss) of every train record of metrics.jsonl, in file order; strict JSON (no bare NaN)."""
  def refuse(name):
    raise ValueError(f'metrics.jsonl holds the non-JSON constant {name}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line, parse_constant=refuse) for line in f]
  return [(r['step'], r['loss']) for r in records if r['split'] == 'train']


def kill_after_checkpoint(run, data, args, step: int = 10) -> None:
  """Start a one-process `fmjax.train` run and SIGKILL it once checkpoint `step` exists and later steps are logged."""
  kill_command_after_checkpoint(command(run, data, *args), run, step)


def kill_command_after_checkpoint(cmd, run, step: int = 10, timeout: float = 180) -> None:
  """Start `cmd` (one process, one thread) writing workdir `run`; SIGKILL it once checkpoint `step` exists and
  later steps are logged."""
  proc = subprocess.Popen(cmd, env=base_env(1, **SERIAL), cwd=ROOT)
  try:
    assert _wait_for(lambda: step in checkpoints(run) and max(logged_losses(run), default=0) >= step + 2, timeout,
                     proc), f'no checkpoint at step {step} followed by logged steps'
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()


def checkpoints(workdir) -> list:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for(predicate, timeout, proc):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.02)
  return False


# XLA's multi-threaded CPU kernels may split reductions differently from run to run when the
# machine is busy; one thread makes every run bit-reproducible, so equality tests resume exactly.
SERIAL = {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'}
