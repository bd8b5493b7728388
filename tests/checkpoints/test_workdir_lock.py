"""Workdir lock: one live run per workdir, stale locks taken over, other hosts refused unless forced.

The end-to-end check (a second CLI run on a live workdir, then after SIGKILL) is in test_train_e2e.py.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from fmjax.checkpoints import lock as workdir_lock
from fmjax.checkpoints.lock import WorkdirLock, WorkdirLockedError


@pytest.fixture
def sleeper():
  """A live process that is not this one (a stand-in for another run's holder)."""
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  yield proc
  proc.kill()
  proc.wait()


def plant(workdir, **fields):
  """Write a lock file as another run would have left it."""
  record = dict(pid=os.getpid(), host=socket.gethostname(), boot_id=workdir_lock.boot_id(), proc_start=None,
                started='2026-01-01 00:00:00 UTC', command='python -m fmjax.train ...', nonce='other')
  record.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'w') as f:
    json.dump(record, f)


def read_lock(workdir):
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
    return json.load(f)


def test_lock_records_the_holder_and_a_second_lock_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path), command='first') as lock:
    record = read_lock(tmp_path)
    assert record['pid'] == os.getpid() and record['host'] == socket.gethostname() and record['command'] == 'first'
    assert record['proc_start'] == workdir_lock.process_start(os.getpid()) is not None
    with pytest.raises(WorkdirLockedError) as e:
      WorkdirLock(str(tmp_path)).acquire()
    text = str(e.value)
    assert f'is in use by pid {os.getpid()}@{socket.gethostname()} since {record["started"]} (first)' in text
    assert '\n' not in text
    assert lock.held
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)
  WorkdirLock(str(tmp_path)).acquire().release()   # free again


def test_live_holder_refuses_and_dead_holder_is_taken_over(tmp_path, sleeper):
  plant(tmp_path, pid=sleeper.pid, proc_start=workdir_lock.process_start(sleeper.pid))
  with pytest.raises(WorkdirLockedError, match=f'in use by pid {sleeper.pid}@'):
    WorkdirLock(str(tmp_path)).acquire()
  sleeper.kill()
  sleeper.wait()
  notices = []
  lock = WorkdirLock(str(tmp_path), notice=notices.append).acquire()
  assert read_lock(tmp_path)['nonce'] == lock.record['nonce']
  assert len(notices) == 1 and f'taking over the lock of pid {sleeper.pid}@' in notices[0]
  assert 'that process is gone' in notices[0]
  lock.release()


def test_reused_pid_is_recognised_by_its_start_time(tmp_path, sleeper):
  plant(tmp_path, pid=sleeper.pid, proc_start='1')   # the holder's pid now belongs to a later process
  assert workdir_lock.holder_state(read_lock(tmp_path)) == 'dead'
  WorkdirLock(str(tmp_path), notice=lambda _: None).acquire().release()


@pytest.mark.skipif(workdir_lock.boot_id() is None, reason='no boot id on this system')
def test_lock_from_before_a_reboot_is_stale(tmp_path):
  plant(tmp_path, boot_id='another-boot')   # our own pid, but from an earlier boot
  assert workdir_lock.holder_state(read_lock(tmp_path)) == 'dead'


def test_other_host_needs_force_unlock(tmp_path):
  plant(tmp_path, host='node-17', pid=4242)
  with pytest.raises(WorkdirLockedError) as e:
    WorkdirLock(str(tmp_path)).acquire()
  assert 'pid 4242@node-17' in str(e.value) and '--config.force_unlock=true' in str(e.value)
  notices = []
  WorkdirLock(str(tmp_path), force=True, notice=notices.append).acquire().release()
  assert 'forced by force_unlock' in notices[0]


def test_unreadable_old_lock_is_taken_over_but_a_fresh_one_is_waited_for(tmp_path, monkeypatch):
  path = tmp_path / workdir_lock.LOCK_FILE
  path.write_text('')
  monkeypatch.setattr(workdir_lock, 'WRITE_GRACE_S', 0.3)   # a fresh empty file may be mid-write: retried
  lock = WorkdirLock(str(tmp_path), notice=lambda _: None).acquire()
  assert read_lock(tmp_path)['nonce'] == lock.record['nonce']
  lock.release()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
  lock = WorkdirLock(str(tmp_path)).acquire()
  plant(tmp_path, nonce='someone-else')   # e.g. forced away by another run
  lock.release()
  assert read_lock(tmp_path)['nonce'] == 'someone-else'


def test_lock_for_run_in_one_process_holds_and_refuses(tmp_path):
  lock = workdir_lock.lock_for_run(str(tmp_path / 'w'))
  try:
    assert lock is not None and lock.held
    with pytest.raises(WorkdirLockedError):
      workdir_lock.lock_for_run(str(tmp_path / 'w'))
  finally:
    lock.release()


def test_train_on_a_locked_workdir_changes_nothing(tmp_path):
  from fmjax import train
  from helpers import text_run_config
  cfg = text_run_config(tmp_path)
  os.makedirs(cfg.workdir)
  (tmp_path / 'workdir' / 'config.json').write_text('{"saved": 1}')
  with WorkdirLock(cfg.workdir):
    before = sorted(os.listdir(cfg.workdir))
    with pytest.raises(WorkdirLockedError):
      train.train(cfg)
    assert sorted(os.listdir(cfg.workdir)) == before
    assert (tmp_path / 'workdir' / 'config.json').read_text() == '{"saved": 1}'
