"""What a resumed run may change: the saved config.json against the new config.

On resume the changes are printed, and run-defining ones (by the role declared beside each field:
model, steps, schedule, seed, data, batch, seq_len) are refused unless `--config.allow_config_change=true`;
the check comes before config.json is rewritten, so a refused resume leaves the workdir as it was.
"""

from __future__ import annotations

import json
import os

import ml_collections

from fmjax import config as config_lib
from fmjax.config import roles
from fmjax.runtime import paths
from fmjax.training import schedules

# Derived from the roles declared beside each field (fmjax/config/roles.py): a resume that changes a
# run-defining option (role 'run', and the model's 'shape' / 'function' / 'restore' fields) is refused
# unless allow_config_change; a 'resume' option is printed and allowed; a 'local' one is not compared.
# The finetune section's run-defining options count for fmjax.finetune only (pretraining ignores them).
# `steps` may change when the schedule does not depend on it (optim.decay_steps fixed, or a constant /
# inverse_sqrt schedule): then it only extends or shortens the run. A cooldown (`is_cooldown`) may change the
# schedule itself: a constant or WSD run that had not begun to decay at the checkpoint becomes a WSD run
# decaying from a step at or after it, so every rate up to the checkpoint stays what it was.
_DEFINING = config_lib.keys_with_role(*roles.RESUME_DEFINING)
RUN_DEFINING = tuple(k for k in _DEFINING if not k.startswith('finetune.'))
FINETUNE_DEFINING = tuple(k for k in _DEFINING if k.startswith('finetune.'))
HARMLESS = config_lib.keys_with_role(roles.RESUME)
NOT_COMPARED = config_lib.keys_with_role(roles.LOCAL)
COOLDOWN_KEYS = ('optim.schedule', 'optim.decay_start', 'optim.decay_fraction', 'optim.decay_shape',
                 'optim.decay_steps', 'optim.end_learning_rate', 'steps')   # what a cooldown may change
_STEPS_FREE = ('constant', 'inverse_sqrt')   # schedules whose rates do not depend on `steps`
_ABSENT = object()


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
  """(key, saved value, new value) for every dotted key that differs (absent keys: `_ABSENT`).

  A key the saved config lacks (a field added to fmjax since) counts as saved with today's default:
  the run was made with it, so keeping the default is no change.
  """
  old, cur = _flatten(saved), _flatten(new)
  defaults = _flatten(json.loads(config_lib.to_json(config_lib.base_config())))
  changes = [(k, old[k] if k in old else defaults.get(k, _ABSENT), cur.get(k, _ABSENT))
             for k in sorted(set(old) | set(cur)) if k not in NOT_COMPARED]
  return [c for c in changes if c[1] != c[2]]


def _schedule_of(tree: dict):
  """(optim section, steps) of a config tree, absent fields as today's defaults."""
  base = config_lib.base_config()
  optim_cfg = base.optim.to_dict()
  optim_cfg.update(tree.get('optim', {}))
  return ml_collections.ConfigDict(optim_cfg), int(tree.get('steps', base.steps))


def is_cooldown(saved: dict, new: dict, step: int | None) -> bool:
  """Whether `new` turns the `saved` constant or WSD run, not yet decaying at checkpoint `step`, into a WSD
  run whose decay starts at or after `step` (the rates before the checkpoint are unchanged)."""
  if step is None:
    return False
  (old_optim, old_steps), (new_optim, new_steps) = _schedule_of(saved), _schedule_of(new)
  if new_optim.schedule != 'wsd' or old_optim.schedule not in ('constant', 'wsd'):
    return False
  if old_optim.schedule == 'wsd' and schedules.decay_start(old_optim, old_steps) < step:
    return False
  return schedules.decay_start(new_optim, new_steps) >= step


def checkpoint_step(workdir: str) -> int | None:
  """The newest step under WORKDIR/checkpoints (its numbered directories), or None."""
  directory = paths.join(workdir, 'checkpoints')
  steps = [int(n) for n in (paths.listdir(directory) if paths.isdir(directory) else []) if n.isdigit()]
  return max(steps) if steps else None


def is_run_defining(key: str, finetune: bool = False) -> bool:
  """Whether changing `key` on resume alters the run's meaning (its role; see RUN_DEFINING).

  A key the schema no longer has is not: nothing reads it now.
  """
  return key in RUN_DEFINING or (finetune and key in FINETUNE_DEFINING)


def _show(value) -> str:
  return '(absent)' if value is _ABSENT else json.dumps(value)


def resume_changes(workdir: str, cfg, resuming: bool, finetune: bool = False, step: int | None = None) -> list[str]:
  """Lines listing how `cfg` differs from WORKDIR/config.json when resuming a checkpoint (at `step`; None:
  the newest under WORKDIR/checkpoints).

  Raises ConfigError (one line) on a run-defining change unless `cfg.allow_config_change`; call
  it before writing config.json, so that a refused resume leaves the workdir as it was.
  """
  path = paths.join(workdir, 'config.json')
  if not resuming or not paths.exists(path):
    return []
  try:
    saved = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    return [f'note: cannot read the saved {path} ({e}); the config is not compared']
  new = json.loads(config_lib.to_json(cfg))
  changes = config_changes(saved, new)
  # `steps` matters through the schedule; with a fixed optim.decay_steps it only lengthens or shortens the run
  saved_optim = saved.get('optim', {})
  fixed_schedule = (bool(new['optim']['decay_steps']) and saved_optim.get('decay_steps') == new['optim']['decay_steps']
                    or new['optim']['schedule'] in _STEPS_FREE
                    and saved_optim.get('schedule', 'cosine') == new['optim']['schedule'])
  allowed = {'steps'} if fixed_schedule else set()
  step = checkpoint_step(workdir) if step is None else step
  cooldown = is_cooldown(saved, new, step) and any(k in COOLDOWN_KEYS for k, _, _ in changes)
  if cooldown:
    allowed |= set(COOLDOWN_KEYS)
  defining = [c for c in changes if is_run_defining(c[0], finetune) and c[0] not in allowed]
  if defining and not cfg.get('allow_config_change', False):
    shown = ', '.join(f'{k} {_show(o)} -> {_show(n)}' for k, o, n in defining[:4])
    more = f' and {len(defining) - 4} more' if len(defining) > 4 else ''
    raise config_lib.ConfigError(f'resuming {workdir} with changed run-defining options: {shown}{more}; restore them, '
                                 'pass --config.allow_config_change=true to resume anyway, or use another --workdir')
  notes = []
  if cooldown:
    optim_cfg, steps = _schedule_of(new)
    notes.append(f'cooldown from the checkpoint at step {step}: {schedules.describe(optim_cfg, steps)}')
  return [f'config change on resume: {k}: {_show(o)} -> {_show(n)}'
          + (' (run-defining, allowed by allow_config_change)' if (k, o, n) in defining else '')
          for k, o, n in changes] + notes
