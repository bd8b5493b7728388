"""Field roles: what each config option means to a checkpoint and to a resumed run.

Every option is declared with `field(default, role, doc)` beside its default (fmjax/config/schema.py);
the compatibility and resume checks read the roles from there, never from hand-kept lists.

Model fields (the `model` section) take one of:
  shape     defines parameter shapes or structure (d_model, vocab, activation, biases, tying):
            a checkpoint restores only into the same value
  function  defines the function without changing shapes (RoPE theta and scaling, norm eps, ...):
            a checkpoint restores only into the same value
  restore   how the function is trained or stored (dropout, param dtype, init): may differ when a
            checkpoint is restored into another run (fine-tune, inference), but not on resume
  resume    how the function is computed (compute dtype, remat, attention kernel, chunk sizes,
            layer scan): may differ on restore and on resume
Other fields take one of:
  run       defines the run (steps, schedule, seed, batch, seq_len, which data): a resume that
            changes it is refused unless allow_config_change
  resume    may change on resume (logging and checkpoint cadence, mesh, progress bar, ...), printed
  local     this invocation only (workdir, lock, allow_config_change): never compared
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import ml_collections

SHAPE, FUNCTION, RESTORE, RESUME, RUN, LOCAL = 'shape', 'function', 'restore', 'resume', 'run', 'local'
MODEL_ROLES = (SHAPE, FUNCTION, RESTORE, RESUME)
RUN_ROLES = (RUN, RESUME, LOCAL)
CHECKPOINT_DEFINING = (SHAPE, FUNCTION)          # a checkpoint restores only into the same values
RESUME_DEFINING = (SHAPE, FUNCTION, RESTORE, RUN)  # a resume that changes them is refused


@dataclass(frozen=True)
class Field:
  """One option: its default value, its role (see the module docstring) and what it means."""
  default: Any
  role: str
  doc: str = ''


def field(default: Any, role: str, doc: str = '') -> Field:
  """Declare an option beside its default; `role` is one of MODEL_ROLES (model section) or RUN_ROLES."""
  if role not in MODEL_ROLES + RUN_ROLES:
    raise ValueError(f'unknown field role {role!r}; choose from {", ".join(dict.fromkeys(MODEL_ROLES + RUN_ROLES))}')
  return Field(default, role, doc)


Tree = Mapping[str, Any]   # name -> Field, or name -> Tree (a section)


def values(tree: Tree, where: str = '') -> ml_collections.ConfigDict:
  """The defaults of `tree` as a ConfigDict (sections nested); every entry must be a Field."""
  out = {}
  for name, item in tree.items():
    if isinstance(item, Mapping):
      out[name] = values(item, f'{where}{name}.')
    elif isinstance(item, Field):
      out[name] = item.default
    else:
      raise TypeError(f'config option {where}{name} declares no role: use field(default, role, doc)')
  return ml_collections.ConfigDict(out)


def collect(tree: Tree, where: str = '', roles: tuple[str, ...] | None = None) -> dict[str, str]:
  """{dotted key: role} of every Field in `tree`; the model section's roles must be MODEL_ROLES."""
  out = {}
  for name, item in tree.items():
    key = f'{where}{name}'
    if isinstance(item, Mapping):
      out.update(collect(item, key + '.', MODEL_ROLES if key == 'model' else roles))
    elif not isinstance(item, Field):
      raise TypeError(f'config option {key} declares no role: use field(default, role, doc)')
    elif item.role not in (roles or RUN_ROLES):
      raise ValueError(f'config option {key} has role {item.role!r}; here choose from '
                       f'{", ".join(roles or RUN_ROLES)}')
    else:
      out[key] = item.role
  return out


def missing_roles(cfg: ml_collections.ConfigDict, registry: Mapping[str, str], where: str = '') -> list[str]:
  """Dotted keys of `cfg` that have no role in `registry` (an option added without `field`)."""
  out = []
  for name in cfg.keys():
    key = f'{where}{name}'
    if isinstance(cfg[name], ml_collections.ConfigDict):
      out += missing_roles(cfg[name], registry, key + '.')
    elif key not in registry:
      out.append(key)
  return out
