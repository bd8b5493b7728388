"""One run per workdir: a lock file held for the life of a train or finetune run.

`WORKDIR/fmjax.lock` is created atomically (O_CREAT | O_EXCL) and records the holder: pid, host,
boot id, the process start time (to tell a reused pid from the holder), start time and command.
A second run finds it and stops with one line naming the holder. A lock left by a dead process on
this host (no such pid, or a pid that now belongs to a later process, or a reboot since) is taken
over with a notice; a lock held on another host cannot be checked from here, so the run refuses
unless `--config.force_unlock=true`. In multi-process runs process 0 holds it for all.

On an object store (a gs:// workdir) the lock is an object created with the store's "only if absent"
precondition (GCS ifGenerationMatch=0, see fmjax.runtime.paths.create_exclusive), so two runs cannot both
create it; taking over a stale one compares its content just before deleting it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
import uuid

from fmjax.runtime import paths
from fmjax.errors import UserError

LOCK_FILE = 'fmjax.lock'
WRITE_GRACE_S = 5.0     # an empty or unreadable lock younger than this may still be being written


class WorkdirLockedError(UserError):
  """The workdir is in use by another run (or its lock cannot be checked)."""


def _read_text(path: str) -> str | None:
  try:
    return paths.read_text(path)
  except (OSError, ValueError):
    return None


def boot_id() -> str | None:
  """This machine's boot id (Linux), to tell a lock from before a reboot."""
  text = _read_text('/proc/sys/kernel/random/boot_id')
  return text.strip() if text else None


def process_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot (Linux /proc), or None."""
  text = _read_text(f'/proc/{pid}/stat')
  if not text or ')' not in text:
    return None
  fields = text.rsplit(')', 1)[1].split()
  return fields[19] if len(fields) > 19 else None   # field 22 of stat; fields here start at field 3


def pid_alive(pid: int) -> bool:
  """Whether a process with this pid exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  return True


def holder_state(record: dict) -> str:
  """'alive', 'dead' or 'unknown' (held on another host) for a lock record."""
  if record.get('host') != socket.gethostname():
    return 'unknown'
  mine = boot_id()
  if mine and record.get('boot_id') and record['boot_id'] != mine:
    return 'dead'
  pid = record.get('pid')
  if not isinstance(pid, int) or not pid_alive(pid):
    return 'dead'
  started = process_start(pid)
  if started and record.get('proc_start') and started != record['proc_start']:
    return 'dead'   # the pid now belongs to a later process
  return 'alive'


def _describe(record: dict) -> str:
  since = record.get('started', '?')
  command = record.get('command', '')
  return f'pid {record.get("pid")}@{record.get("host")} since {since}' + (f' ({command})' if command else '')


class WorkdirLock:
  """`WORKDIR/fmjax.lock` for one run: `acquire()` or raise WorkdirLockedError; `release()` at the end."""

  def __init__(self, workdir: str, force: bool = False, command: str | None = None, notice=None):
    self.workdir = paths.resolve(workdir)
    self.path = paths.join(self.workdir, LOCK_FILE)
    self.force = force
    self.record = {
        'pid': os.getpid(), 'host': socket.gethostname(), 'boot_id': boot_id(),
        'proc_start': process_start(os.getpid()),
        'started': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
        'command': command if command is not None else ' '.join([os.path.basename(sys.executable)] + sys.argv),
        'nonce': uuid.uuid4().hex,
    }
    self.notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
    self.held = False

  def acquire(self) -> 'WorkdirLock':
    """Create the lock file, taking over a stale one; raise WorkdirLockedError if another run holds it."""
    for _ in range(50):
      try:
        created = paths.create_exclusive(self.path, json.dumps(self.record).encode())
      except OSError as e:
        raise WorkdirLockedError(f'cannot create the lock file {self.path}: {e.strerror or e}; check that the '
                                 'workdir is writable') from e
      if not created:
        self._handle_existing()
        continue
      self.held = True
      return self
    raise WorkdirLockedError(f'could not take the lock {self.path}: other runs keep creating it; start one run '
                             'per workdir')

  def _handle_existing(self) -> None:
    """The lock file exists: raise if its holder may be running, else remove it (stale)."""
    text = _read_text(self.path)
    if text is None:
      return   # removed meanwhile: retry
    try:
      record = json.loads(text)
      assert isinstance(record, dict)
    except (ValueError, AssertionError):
      record = None
    if record is None:
      if time.time() - _mtime(self.path) < WRITE_GRACE_S:
        time.sleep(0.1)   # its holder is probably writing it right now
        return
      state = 'dead'
    else:
      state = holder_state(record)
    if state == 'alive' and not self.force:
      raise WorkdirLockedError(f'workdir {self.workdir} is in use by {_describe(record)}; wait for that run to end '
                               'or use another --workdir')
    if state == 'unknown' and not self.force:
      raise WorkdirLockedError(f'workdir {self.workdir} is locked by {_describe(record)} on another host, which '
                               'cannot be checked from here; if that run has ended, rerun with '
                               '--config.force_unlock=true')
    what = 'an unreadable lock' if record is None else f'the lock of {_describe(record)}'
    why = 'forced by force_unlock' if state != 'dead' else 'that process is gone'
    if self._remove_if_unchanged(text):
      self.notice(f'fmjax: taking over {what} in {self.workdir} ({why})')

  def _remove_if_unchanged(self, text: str) -> bool:
    """Remove the lock file if it still holds `text` (under an flock of the workdir, so that two runs
    taking over the same stale lock cannot remove each other's new one; on object stores, which have no
    locks, by comparing just before the delete)."""
    if paths.is_url(self.workdir):
      if _read_text(self.path) != text:
        return False
      paths.remove(self.path)
      return True
    fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      if _read_text(self.path) != text:
        return False
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
      return True
    finally:
      os.close(fd)   # closing releases the flock

  def release(self) -> None:
    """Remove the lock file if this run still holds it."""
    if not self.held:
      return
    self.held = False
    text = _read_text(self.path)
    try:
      mine = text is not None and json.loads(text).get('nonce') == self.record['nonce']
    except (ValueError, AttributeError):
      mine = False
    if mine:
      paths.remove(self.path)

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _mtime(path: str) -> float:
  try:
    return os.path.getmtime(path) if not paths.is_url(path) else paths.epath_of(path).stat().mtime
  except OSError:
    return 0.0


def lock_for_run(workdir: str, force: bool = False) -> WorkdirLock | None:
  """Process 0 takes the workdir lock; every process raises WorkdirLockedError if it failed.

  Returns the held lock on process 0 (release it at the end of the run), None elsewhere.
  """
  import jax  # pylint: disable=import-outside-toplevel
  lock, error = None, ''
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, force=force)
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      lock, error = None, str(e)
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(1 if error else 0)))
    if failed and not error:
      error = f'workdir {paths.resolve(workdir)} is in use by another run (process 0 reports the holder)'
  if error:
    raise WorkdirLockedError(error)
  return lock
