"""Orbax checkpoints: train state + data-iterator state + metadata, restorable onto any mesh.

Layout: WORKDIR/checkpoints/<step>/{state, meta, data}. `meta` (JSON) records the model config,
scan layout, tokenizer and fmjax version, so later tools need no flags the checkpoint knows.
Only finalised checkpoints are seen: an interrupted save is ignored and the previous one used.

Failures are one-line CheckpointErrors: a save that cannot be written (disk full, read-only)
names the step, the OS reason, the file and the checkpoints still intact; a damaged checkpoint
names the step, the file or array that failed and the earlier checkpoint to resume from. A failed
async save is reported at the first `check`, `save`, `wait` or `close` after it happened.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

import fmjax
from fmjax import config as config_lib
from fmjax.config import roles
from fmjax.runtime import paths
from fmjax.errors import UserError

# Model options that change parameter shapes or structure (role 'shape'), and those that change the
# function without changing shapes (role 'function'; fmjax/config/roles.py): a checkpoint restores only
# into the same values.
SHAPE_KEYS = config_lib.keys_with_role(roles.SHAPE, section='model')
FUNCTION_KEYS = config_lib.keys_with_role(roles.FUNCTION, section='model')


class CheckpointError(UserError):
  """A checkpoint that cannot be used with this config, or cannot be written or read."""


class WorkdirWriteError(CheckpointError):
  """A write to the workdir failed (disk full, read-only, ...); reported in one line like any CheckpointError."""


def make_metadata(cfg, tokenizer_spec: str | None = None, extra: dict | None = None) -> dict:
  """What a checkpoint records besides arrays."""
  meta = {
      'fmjax_version': fmjax.__version__,
      'model': cfg.model.to_dict(),
      'scan_layers': bool(cfg.model.scan_layers),
      'tokenizer': tokenizer_spec if tokenizer_spec is not None else cfg.data.tokenizer,
      'seq_len': cfg.seq_len,
      'mesh': cfg.mesh.to_dict(),
  }
  meta.update(extra or {})
  return meta


def check_compatible(meta: dict, model_cfg, where: str) -> None:
  """Raise CheckpointError naming the first shape- or function-defining option that differs.

  A field the metadata lacks (added to fmjax after the checkpoint was written) counts as today's default.
  """
  saved = meta.get('model') or {}      # metadata without a model section: nothing to compare
  defaults = config_lib.model_defaults()
  for key in SHAPE_KEYS + FUNCTION_KEYS if saved else ():
    old, new = saved.get(key, defaults[key]), model_cfg.get(key, defaults[key])
    if old != new:
      absent = '' if key in saved else ' (absent from its metadata: the default)'
      raise CheckpointError(f'checkpoint {where} has model.{key}={old!r}{absent} but the config has '
                            f'{new!r}; use the matching config or another --workdir')
  if 'scan_layers' in meta and meta['scan_layers'] != model_cfg.scan_layers:
    raise CheckpointError(f'checkpoint {where} was saved with model.scan_layers={meta["scan_layers"]}; set '
                          f'--config.model.scan_layers={str(meta["scan_layers"]).lower()} (or convert it with '
                          'tools/convert_checkpoint.py)')


class Checkpointer:
  """A thin CheckpointManager wrapper: save every N steps, keep K, resume from the latest.

  `Checkpointer(directory, keep, async_save)` writes (it creates the directory, keeps `keep` steps and
  removes the partial saves an earlier run left); fmjax constructs writers only in
  fmjax/training/session.py, the run lifecycle. Every reader uses `Checkpointer.open_for_reading`, which
  creates, deletes and saves nothing.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, *, read_only: bool = False):
    self.directory = paths.resolve(directory)
    self.read_only = read_only
    _quiet_orbax_failure_noise()
    if read_only:   # Orbax's own read_only option logs warnings on every open: refuse saves here instead
      options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True, cleanup_tmp_directories=True)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise WorkdirWriteError(f'cannot create the checkpoint directory {self.directory}: '
                              f'{_os_reason(e) or e}; choose a writable --workdir') from None
    self._pending: int | None = None   # step of an async save not yet known to have succeeded

  @classmethod
  def open_for_reading(cls, directory: str) -> 'Checkpointer':
    """A Checkpointer that only reads `directory` (an existing checkpoints directory)."""
    return cls(directory, read_only=True)

  def latest_step(self) -> int | None:
    """The newest finalised checkpoint step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, data_arg: Any = None, force: bool = False) -> bool:
    """Start a (possibly async) save of state, metadata and the data-iterator state."""
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened for reading: checkpoints are written by the run '
                            'lifecycle (fmjax.training.session)')
    self._finish_pending()
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_arg is not None:
      items['data'] = data_arg
    try:
      started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 - any failure to write becomes one line
      raise self._save_error(step, e) from e
    if started:
      self._pending = step
    return started

  def check(self) -> None:
    """Raise WorkdirWriteError now if an async save has failed; never blocks on a save in progress."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish_pending()

  def read_metadata(self, step: int) -> dict:
    """The JSON metadata of a checkpoint."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - report any Orbax failure as one line
      raise self._read_error(step, e, 'read the metadata of') from e
    return dict(out['meta'])

  def restore(self, step: int, abstract_state, data_arg: Any = None, params_only: bool = False):
    """Restore onto the shardings carried by `abstract_state` (any mesh). Returns the state.

    With `params_only`, `abstract_state` is a params tree and only the parameters are read.
    """
    if params_only:
      target = {'params': abstract_state}
      items = dict(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    else:
      items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_arg is not None:
      items['data'] = data_arg
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      raise self._read_error(step, e, 'restore') from e
    state = out['state']
    return state['params'] if params_only else state

  def wait(self) -> None:
    """Block until pending async saves are complete; a failed one raises WorkdirWriteError."""
    self._finish_pending()

  def close(self) -> None:
    """Wait for the pending save (raising its failure) and release Orbax's threads."""
    try:
      self._finish_pending()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # noqa: BLE001
        raise self._save_error(None, e) from e

  def intact_steps(self, exclude: int | None = None) -> list[int]:
    """Finalised checkpoint steps on disk (every file present; `exclude` left out), oldest first."""
    names = _listdir(self.directory)
    steps = sorted(int(n) for n in names if n.isdigit() and int(n) != exclude)
    return [s for s in steps if _unreadable_json(paths.join(self.directory, str(s))) is None
            and paths.isdir(paths.join(self.directory, str(s), 'state'))]

  def _finish_pending(self) -> None:
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step, e) from e

  def _save_error(self, step: int | None, e: BaseException) -> WorkdirWriteError:
    """One line: which step, the OS reason, the file, what is intact and what to do."""
    code = _os_errno(e)
    reason = os.strerror(code).lower() if code else _root_message(e)
    path = _failed_path(e)
    where = f' (writing {path})' if path else ''
    intact = self.intact_steps(exclude=step)
    kept = (f'checkpoint{"s" if len(intact) > 1 else ""} {", ".join(map(str, intact))} '
            f'{"are" if len(intact) > 1 else "is"} intact' if intact else 'no earlier checkpoint is intact')
    partial = [n for n in _listdir(self.directory)
               if step is not None and n.startswith(f'{step}.orbax-checkpoint-tmp')]
    todo = {errno.ENOSPC: 'free disk space', errno.EDQUOT: 'free disk space (quota)',
            errno.EACCES: f'make {self.directory} writable', errno.EROFS: 'use a writable --workdir'}.get(
                code, 'fix the cause')
    if partial:
      todo += f' (the partial save {paths.join(self.directory, partial[0])} can be deleted)'
    resume = f' from step {intact[-1]}' if intact else ''
    what = f'checkpoint {step}' if step is not None else 'a checkpoint'
    return WorkdirWriteError(f'cannot save {what} in {self.directory}: {reason}{where}; {kept}; '
                             f'{todo} and rerun to resume{resume}')

  def _read_error(self, step: int, e: BaseException, action: str) -> CheckpointError:
    """One line: which step, which file or array failed, which earlier checkpoint is intact, what to do."""
    step_dir = paths.join(self.directory, str(step))
    damage = _damage(step_dir, e)
    if damage is None:  # the files parse: most likely another model or config
      return CheckpointError(f'cannot {action} checkpoint {step} in {self.directory} ({_root_message(e)}); it holds '
                             f'{", ".join(sorted(_listdir(step_dir))) or "nothing"}; is it complete and made '
                             'with this model config?')
    earlier = [s for s in self.intact_steps(exclude=step) if s < step]
    if earlier:
      todo = (f'checkpoint {earlier[-1]} is intact: move this one aside (mv {step_dir} {step_dir}.bad) to '
              f'resume from step {earlier[-1]}')
    else:
      todo = 'no earlier checkpoint is intact: move it aside to start afresh, or restore it from a copy'
    return CheckpointError(f'cannot {action} checkpoint {step} in {self.directory}: it is damaged: {damage}; '
                           f'{todo}')


def finalised_steps(directory: str) -> list[int]:
  """The steps of `directory` whose save completed (Orbax renames a finished local save into place;
  on an object store it writes commit_success.txt last), oldest first; never raises."""
  names = [n for n in _listdir(directory) if n.isdigit()]
  if paths.is_url(directory):
    names = [n for n in names if _exists(paths.join(directory, n, 'commit_success.txt'))]
  return sorted(int(n) for n in names)


def _exists(path: str) -> bool:
  try:
    return paths.exists(path)
  except Exception:  # noqa: BLE001 - an unreachable store: not known to exist
    return False


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a live tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# --- Reading Orbax / TensorStore failures -------------------------------------------------------

_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_TS_ITEM = re.compile(r'Error (?:reading|writing|opening) "([^"]+)" in OCDBT database at local file "([^"]+)"')
_TS_FILE = re.compile(r'(?:Failed writing:|Error (?:decoding|reading|writing|opening) local file) "([^"]+)"')
_TS_STATUS = re.compile(r'^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|'
                        r'RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNKNOWN|INTERNAL): ')
_JSON_FILES = ('_METADATA', '_CHECKPOINT_METADATA', 'metadata', '_sharding')


def _chain(e: BaseException) -> Iterator[BaseException]:
  """e, then its causes / contexts, outermost first."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _os_errno(e: BaseException) -> int | None:
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno:
      return x.errno
    m = _OS_CODE.search(str(x))
    if m:
      return int(m.group(1))
    if 'No space left on device' in str(x):
      return errno.ENOSPC
  return None


def _os_reason(e: BaseException) -> str | None:
  code = _os_errno(e)
  return os.strerror(code).lower() if code else None


def _failed_path(e: BaseException) -> str | None:
  """The file a write or read failed on, from an OSError or TensorStore's error text."""
  for x in reversed(list(_chain(e))):
    if isinstance(x, OSError) and x.filename:
      return str(x.filename)
    m = _TS_FILE.search(str(x))
    if m:
      return m.group(1)
    m = _TS_ITEM.search(str(x))
    if m:
      return m.group(2)
  return None


def _clean(text: str) -> str:
  """The first line of an error text without TensorStore specs and object reprs."""
  lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
  line = lines[0] if lines else ''
  if line.endswith(':') and len(lines) > 1:  # 'tree structures do not match:' + the first differing key
    line = f'{line} {lines[1].rstrip(":")}'
  line = re.split(r' \[tensorstore_spec| See full TensorStore details|<bound method', line)[0].strip()
  return line if len(line) <= 300 else line[:line.rfind(' ', 0, 300)] + ' ...'


def _root_message(e: BaseException) -> str:
  """'Type: message' of the innermost exception, cleaned."""
  root = list(_chain(e))[-1]
  text = _clean(str(root))
  return f'{type(root).__name__}: {text}' if text else type(root).__name__


def _damage(step_dir: str, e: BaseException) -> str | None:
  """What is damaged in a checkpoint ('array A in FILE: reason', 'FILE is not valid JSON'), or None."""
  for x in reversed(list(_chain(e))):
    text = str(x)
    item, file = _TS_ITEM.search(text), _TS_FILE.search(text)
    if file or item:
      array = f'array {item.group(1).split("/")[0]}' if item else ''
      where = f'{file.group(1)} ({array})' if file and array else (file.group(1) if file else
                                                                   f'{array} in {item.group(2).rstrip("/")}')
      reason = _clean(text[(file or item).end():].lstrip(': ')) or _clean(text)
      return f'{where}: {_lower_first(reason)}'
  bad_json = _unreadable_json(step_dir)
  if bad_json:
    return bad_json
  for x in _chain(e):
    if isinstance(x, OSError) and x.filename:
      return f'{x.filename}: {(x.strerror or str(x)).lower()}'
    if _TS_STATUS.match(str(x)):
      return _clean(str(x))
  return None


def _lower_first(text: str) -> str:
  return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _unreadable_json(step_dir: str) -> str | None:
  """'FILE is not valid JSON (...)' for the first damaged JSON file of a checkpoint, else None."""
  for root, _, files in paths.walk(step_dir):
    for name in sorted(files):
      if name in _JSON_FILES or name.endswith('.json') or paths.basename(root) == 'array_metadatas':
        path = paths.join(root, name)
        try:
          json.loads(paths.read_text(path))
        except ValueError as err:
          return f'{path} is not valid JSON ({getattr(err, "msg", type(err).__name__)})'
        except OSError as err:
          return f'{path} cannot be read ({err.strerror})'
  return None


def _listdir(directory: str) -> list[str]:
  try:
    return paths.listdir(directory)
  except OSError:
    return []


# --- Keeping a failed save or read to one line on the console -----------------------------------

_QUIETED = False


class _DropOrbaxErrors(logging.Filter):
  """Drop Orbax's own error logs: the failure they describe is raised as one CheckpointError."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    return f'{os.sep}orbax{os.sep}' not in record.pathname and 'orbax' not in str(record.msg)[:4000] \
        and not (record.args and 'orbax' in repr(record.args)[:4000])


def _quiet_orbax_failure_noise() -> None:
  """After a failed save or read Orbax logs the error several times and its TensorStore callbacks print
  'Event loop is closed' tracebacks: hundreds of lines for one failure, which CheckpointError reports."""
  global _QUIETED
  if _QUIETED:
    return
  _QUIETED = True
  for name in ('absl', 'asyncio'):
    logging.getLogger(name).addFilter(_DropOrbaxErrors())
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    from_orbax = code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
    loop_closed = isinstance(unraisable.exc_value, RuntimeError) and 'Event loop is closed' in str(
        unraisable.exc_value)
    if not (from_orbax or loop_closed):
      previous(unraisable)

  sys.unraisablehook = hook
