"""End to end through `python -m fmjax.train`: kills, preemption, multi-process runs on CPU."""

import os
import signal
import subprocess
import time

import pytest

from cli_runs import (ROOT, SERIAL, TINY, _wait_for, base_env, checkpoints, command, free_port,  # noqa: F401
                      kill_after_checkpoint, logged_losses, train_cli, train_records)
from helpers import write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('e2e')
  return {'files': write_corpus(root / 'corpus', n_files=24), 'cache': str(root / 'cache')}


def test_two_processes_match_one_and_checkpoints_cross_process_counts(tmp_path, data):
  ref = tmp_path / 'ref'
  assert train_cli(ref, data) == [0]
  two = tmp_path / 'two'
  assert train_cli(two, data, '--config.steps=4', processes=2, devices=4) == [0, 0]
  assert train_cli(two, data) == [0]                       # 2-process checkpoint resumed by 1 process
  one = tmp_path / 'one'
  assert train_cli(one, data, '--config.steps=4') == [0]
  assert train_cli(one, data, processes=2, devices=4) == [0, 0]  # and the reverse
  seq = tmp_path / 'sequence'   # context parallelism: every row split over 8 devices of the 2 processes
  assert train_cli(seq, data, '--config.mesh.fsdp=1', '--config.mesh.sequence=8', processes=2, devices=4) == [0, 0]
  want = logged_losses(ref)
  assert sorted(want) == list(range(1, 9))
  for run in (two, one, seq):
    got = logged_losses(run)
    for step in range(1, 9):
      assert got[step] == pytest.approx(want[step], rel=1e-5), (run.name, step)


MOE = ('--config.model.num_experts=8', '--config.model.num_experts_per_tok=2', '--config.model.moe_mlp_dim=32',
       '--config.checkpoint_every=0')


def test_an_moe_run_with_experts_across_two_processes_matches_one_device(tmp_path, data):
  """8 experts over an expert axis spanning 2 processes x 4 devices: the tokens of each process go to the
  experts of the other and back, and every step's loss is the single device's, which stopped at step 4
  and resumed from its checkpoint."""
  assert train_cli(tmp_path / 'one', data, *MOE, '--config.mesh.fsdp=1', '--config.steps=4', devices=1) == [0]
  assert train_cli(tmp_path / 'one', data, *MOE, '--config.mesh.fsdp=1', devices=1) == [0]
  assert train_cli(tmp_path / 'two', data, *MOE, '--config.mesh.fsdp=1', '--config.mesh.expert=8', processes=2,
                   devices=4) == [0, 0]
  want, got = logged_losses(tmp_path / 'one'), logged_losses(tmp_path / 'two')
  assert sorted(got) == sorted(want) == list(range(1, 9))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step


def _slow_run(*extra):
  # a model big enough that a step takes long enough to act between steps
  return ('--config.model.d_model=128', '--config.model.mlp_dim=512', '--config.seq_len=32',
          '--config.global_batch_size=32', '--config.steps=40', '--config.checkpoint_every=10',
          '--config.async_checkpoints=false', '--config.optim.decay_steps=40', *extra)


def test_sigkill_after_a_checkpoint_resumes_bit_identically(tmp_path, data):
  ref = tmp_path / 'ref'
  assert train_cli(ref, data, *_slow_run(), devices=1, env=SERIAL) == [0]
  run = tmp_path / 'run'
  kill_after_checkpoint(run, data, _slow_run())
  assert checkpoints(run)[-1] < 40
  killed_at = max(logged_losses(run))
  assert killed_at > checkpoints(run)[-1], 'steps after the last checkpoint were logged before the kill'
  assert train_cli(run, data, *_slow_run(), devices=1, env=SERIAL) == [0]
  want, got = logged_losses(ref), logged_losses(run)
  assert killed_at < 40 and set(range(11, 41)) <= set(got)
  for step in range(11, 41):
    assert got[step] == want[step], step                    # bit-identical (fp32, CPU)
  # the log matches the resumed state: each step once (the steps logged after checkpoint 10 and
  # before the kill were dropped on resume), equal to the uninterrupted run's log
  assert train_records(run) == train_records(ref)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, data):
  ref = tmp_path / 'ref'
  assert train_cli(ref, data, *_slow_run(), devices=1, env=SERIAL) == [0]
  run = tmp_path / 'run'
  proc = subprocess.Popen(command(run, data, *_slow_run('--config.checkpoint_every=0')), env=base_env(1, **SERIAL),
                          cwd=ROOT)
  try:
    assert _wait_for(lambda: os.path.exists(run / 'metrics.jsonl') and len(logged_losses(run)) >= 3, 180, proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    took = time.time() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
  saved = checkpoints(run)
  assert len(saved) == 1 and 3 <= saved[0] < 40, saved
  assert took < 20, took
  assert train_cli(run, data, *_slow_run('--config.checkpoint_every=0'), devices=1, env=SERIAL) == [0]
  want, got = logged_losses(ref), logged_losses(run)
  for step in range(saved[0] + 1, 41):
    assert got[step] == want[step], step


def test_wrong_process_count_fails_fast_with_one_line(tmp_path, data):
  port = free_port()
  procs = [subprocess.Popen(command(tmp_path / 'w', data), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=base_env(4, FMJAX_COORDINATOR=f'127.0.0.1:{port}', FMJAX_NUM_PROCESSES=3,
                                         FMJAX_PROCESS_ID=i, FMJAX_INIT_TIMEOUT=5))
           for i in range(2)]
  start = time.time()
  try:
    for p in procs:
      _, err = p.communicate(timeout=60)
      assert p.returncode == 2
      assert 'could not form the run' in err and 'FMJAX_NUM_PROCESSES' in err
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert time.time() - start < 30


def test_nonfinite_run_stops_with_one_line_and_the_last_checkpoint_restores(tmp_path, data):
  import jax
  import numpy as np
  from fmjax import config
  from fmjax.training import build
  from fmjax.checkpoints import store as checkpoint
  run = tmp_path / 'nan'
  overrides = ('--config.optim.learning_rate=1e30', '--config.steps=12', '--config.optim.decay_steps=12',
               '--config.checkpoint_every=1', '--config.keep_checkpoints=2', '--config.async_checkpoints=false')
  proc = subprocess.run(command(run, data, *overrides), env=base_env(1), cwd=ROOT, capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 2, proc.stderr
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('fmjax.train: error: step '), proc.stderr
  bad = int(err[0].split('step ')[1].split(':')[0])
  assert 1 < bad < 12
  assert f'the last checkpoint written is step {bad - 1}' in err[0]
  logged = logged_losses(run)
  assert all(np.isfinite(logged[s]) for s in range(1, bad))    # every step before it was finite ...
  assert checkpoints(run) == ([bad - 2, bad - 1] if bad > 2 else [1])  # ... checkpointed, and nothing after
  cfg = config.resolve(TINY, [o[len('--config.'):] for o in overrides])
  abstract = build.build_lm_run(cfg, compile_step=False).state.abstract
  ckpt = checkpoint.Checkpointer(str(run / 'checkpoints'), async_save=False)
  state = ckpt.restore(bad - 1, abstract)
  ckpt.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((state.params, state.opt_state)))
  assert not os.path.exists(run / 'fmjax.lock')


def test_second_run_on_a_live_workdir_is_refused_then_takes_over_after_sigkill(tmp_path, data):
  run = tmp_path / 'run'
  first = subprocess.Popen(command(run, data, *_slow_run()), env=base_env(1, **SERIAL), cwd=ROOT)
  try:
    assert _wait_for(lambda: os.path.exists(run / 'metrics.jsonl') and len(logged_losses(run)) >= 2, 180, first)
    # Frozen mid-run (alive, holding the lock) so it cannot finish its 40 steps while the second run
    # starts: with the suite's compilation cache a step is quick and the race was real.
    first.send_signal(signal.SIGSTOP)
    config_before = (run / 'config.json').read_bytes()
    started = time.time()
    second = subprocess.run(command(run, data, *_slow_run()), env=base_env(1, **SERIAL), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    took = time.time() - started
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1, second.stderr
    assert f'is in use by pid {first.pid}@' in err[0] and err[0].startswith('fmjax.train: error: workdir ')
    assert took < 60, took                  # python + jax import; nothing is compiled
    assert (run / 'config.json').read_bytes() == config_before
    assert first.poll() is None             # the first run was not disturbed
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
  finally:
    if first.poll() is None:
      first.kill()
  third = subprocess.run(command(run, data, *_slow_run()), env=base_env(1, **SERIAL), cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
  assert third.returncode == 0, third.stderr
  assert f'taking over the lock of pid {first.pid}@' in third.stderr
  assert max(logged_losses(run)) == 40 and not os.path.exists(run / 'fmjax.lock')
