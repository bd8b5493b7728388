"""Multi-process runs on CPU (2 processes on 127.0.0.1): preemption in any process, dead peers, and
JAX's cluster detection (SLURM variables) starting the runtime without the FMJAX_* variables."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import write_corpus
from cli_runs import ROOT, SERIAL, base_env, checkpoints, command, free_port, logged_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  return {'files': write_corpus(root / 'corpus', n_files=24), 'cache': str(root / 'cache')}


def slow_run(*extra):
  """A model whose steps take long enough to signal between them; no periodic checkpoints."""
  return ('--config.model.d_model=128', '--config.model.mlp_dim=512', '--config.global_batch_size=32',
          '--config.steps=30', '--config.checkpoint_every=0', '--config.async_checkpoints=false',
          '--config.optim.decay_steps=30', *extra)


def start(workdir, data, *overrides, env=None):
  """Two processes of one run (2 CPU devices each) with a localhost coordinator."""
  port = free_port()
  return [subprocess.Popen(command(workdir, data, *overrides), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                           env=base_env(2, FMJAX_COORDINATOR=f'127.0.0.1:{port}', FMJAX_NUM_PROCESSES=2,
                                        FMJAX_PROCESS_ID=i, **SERIAL, **(env or {})))
          for i in range(2)]


def finish(procs, timeout) -> list[tuple[int, str]]:
  """(exit code, stderr) of each process; kills what is left after `timeout` seconds in all."""
  deadline = time.time() + timeout
  out = []
  try:
    for p in procs:
      _, err = p.communicate(timeout=max(deadline - time.time(), 1))
      out.append((p.returncode, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return out


def wait_for_steps(workdir, steps, procs, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(workdir / 'metrics.jsonl') and len(logged_losses(workdir)) >= steps:
      return
    assert all(p.poll() is None for p in procs), 'a process ended before the run got going'
    time.sleep(0.05)
  raise AssertionError(f'fewer than {steps} steps logged in {timeout}s')


def test_sigterm_to_one_process_saves_one_step_in_all_and_resumes_exactly(tmp_path, data):
  ref = tmp_path / 'ref'
  assert [code for code, _ in finish(start(ref, data, *slow_run()), 300)] == [0, 0]
  run = tmp_path / 'run'
  procs = start(run, data, *slow_run())
  try:
    wait_for_steps(run, 3, procs)
    procs[1].send_signal(signal.SIGTERM)       # the non-leader: it alone gets the notice
  finally:
    results = finish(procs, 120)
  saved = checkpoints(run)
  assert [code for code, _ in results] == [0, 0], results
  stops = [re.findall(r'preemption: saving at step (\d+)', err) for _, err in results]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops            # both stopped at one step
  assert saved == [int(stops[0][0])] and 3 <= saved[0] < 30, saved     # and saved it together
  resumed = finish(start(run, data, *slow_run()), 300)
  assert [code for code, _ in resumed] == [0, 0], [err[-1500:] for _, err in resumed]
  want, got = logged_losses(ref), logged_losses(run)
  assert set(range(1, 31)) == set(got)
  for step in range(saved[0] + 1, 31):
    assert got[step] == want[step], step                 # bit-exact resume (fp32, serial CPU kernels)


@pytest.mark.parametrize('victim,how', [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGSTOP)],
                         ids=['peer-killed', 'peer-frozen', 'coordinator-frozen'])
def test_a_dead_peer_stops_the_others_promptly_with_one_line(tmp_path, data, victim, how):
  """A killed peer (gloo reports it at once on CPU) and a frozen one (no error at all: on TPU the
  collective just waits) both stop the survivor within the heartbeat timeout, with one line."""
  run = tmp_path / 'run'
  procs = start(run, data, *slow_run('--config.steps=1000', '--config.optim.decay_steps=1000'),
                env={'FMJAX_HEARTBEAT_TIMEOUT': 5})
  survivor = procs[1 - victim]
  try:
    wait_for_steps(run, 2, procs)
    procs[victim].send_signal(how)
    sent = time.time()
    survivor.wait(timeout=60)
    took = time.time() - sent
    err = survivor.stderr.read()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert survivor.returncode == 2, err[-2000:]
  assert took < 40, took   # the heartbeat timeout (5 s) plus a busy machine's slack
  lines = [line for line in err.splitlines() if 'another process of the run stopped' in line]
  assert len(lines) == 1 and lines[0].startswith('fmjax: error: ') and 'restart all' in lines[0], err[-2000:]
  assert 'Traceback' not in err and 'stack trace' not in err, err[-2000:]


PROBE = ('from fmjax.runtime import distributed; distributed.initialize(); import jax; '
         'print("processes", jax.process_count(), "index", jax.process_index(), "devices", jax.device_count())')


def slurm_port_and_job() -> tuple[int, int]:
  """A SLURM job id whose coordinator port (JAX: job id % 4096 + 61440) is free here."""
  for _ in range(50):
    job = int.from_bytes(os.urandom(2), 'little') + 1000
    port = job % 4096 + 61440
    try:
      import socket
      with socket.socket() as s:
        s.bind(('127.0.0.1', port))
      return port, job
    except OSError:
      continue
  pytest.skip('no free port in SLURM\'s coordinator range')


def test_slurm_variables_start_the_runtime_through_jax_cluster_detection():
  """No FMJAX_* variables: JAX's SLURM detector finds 2 tasks, and both processes form one run."""
  _, job = slurm_port_and_job()
  env = {k: v for k, v in base_env(2).items() if not k.startswith(('FMJAX_COORDINATOR', 'SLURM_'))}
  env.update(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2', FMJAX_INIT_TIMEOUT='60')
  procs = [subprocess.Popen([sys.executable, '-c', PROBE], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**env, 'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i)})
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=120)
      assert p.returncode == 0, err[-2000:]
      outs.append(out.strip().splitlines()[-1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert outs == ['processes 2 index 0 devices 4', 'processes 2 index 1 devices 4']


def test_no_cluster_means_one_process():
  env = {k: v for k, v in base_env(2).items() if not k.startswith(('FMJAX_COORDINATOR', 'SLURM_'))}
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, text=True, capture_output=True, env=env,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == 'processes 1 index 0 devices 2'
