"""Model families, registered by name: each module here translates one HF family both ways.

A family is an object (a module or an instance) with
  NAME             fmjax's name for it ('llama'), the --family value
  ARCHITECTURE     the HF class an export names ('LlamaForCausalLM')
  MODEL_TYPES      the config.json model_type values it reads ('llama', 'mistral'); the first is written
  TITLES           display names, one per model type ('Llama', 'Mistral'), for --help
  IGNORED          regexes of HF tensors with no fmjax counterpart (buffers, tied copies)
  OPTIONAL_PREFIX  a base-model prefix some HF files omit ('transformer.')
  mismatch(model_cfg) -> why an fmjax model config is not this family's shape, or None
  to_hf_config(model_cfg) -> config.json;  from_hf_config(config.json) -> fmjax model options
  rules(model_cfg) -> the weight mapping table (fmjax/convert/mapping.py)
and calls `register` when its module is imported. Every module of this package is imported on the
first lookup, so a new family is one new file. Family modules stay light (no jax): the command
line lists them in its --help.
"""

from __future__ import annotations

import importlib
import pkgutil

from fmjax.convert.mapping import ConversionError

_REQUIRED = ('NAME', 'ARCHITECTURE', 'MODEL_TYPES', 'TITLES', 'IGNORED', 'OPTIONAL_PREFIX',
             'mismatch', 'to_hf_config', 'from_hf_config', 'rules')
_REGISTRY: dict = {}   # NAME -> family, in registration order
_loaded = False


def register(family):
  """Add `family` (see the module docstring); returns it. Names and model types are unique."""
  missing = [a for a in _REQUIRED if not hasattr(family, a)]
  if missing:
    raise TypeError(f'family {getattr(family, "NAME", family)!r} lacks {", ".join(missing)}')
  if len(family.TITLES) != len(family.MODEL_TYPES):
    raise TypeError(f'family {family.NAME!r}: one title per model type ({family.MODEL_TYPES})')
  known = _REGISTRY.get(family.NAME)
  if known is not None and known is not family:
    raise ValueError(f'family {family.NAME!r} is registered twice')
  owners = {t: f.NAME for f in _REGISTRY.values() if f is not family for t in f.MODEL_TYPES}
  taken = [t for t in family.MODEL_TYPES if t in owners]
  if taken:
    raise ValueError(f'family {family.NAME!r}: model_type {taken[0]!r} is already read by {owners[taken[0]]!r}')
  _REGISTRY[family.NAME] = family
  return family


def _module_name(family) -> str:
  """The module that defines `family` (a module itself, a class, or an instance of a class of one)."""
  if hasattr(family, '__file__'):
    return family.__name__
  return family.__module__ if isinstance(family, type) else type(family).__module__


def registered() -> tuple:
  """Every family, once each family module of this package is imported: by module name, in registration
  order within a module (whichever module a caller happened to import first)."""
  global _loaded
  if not _loaded:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
      importlib.import_module(f'{__name__}.{info.name}')
    _loaded = True
  return tuple(sorted(_REGISTRY.values(), key=_module_name))


def names() -> tuple[str, ...]:
  """The --family values."""
  return tuple(f.NAME for f in registered())


def model_types() -> tuple[str, ...]:
  """Every config.json model_type a family reads."""
  return tuple(t for f in registered() for t in f.MODEL_TYPES)


def titles() -> tuple[str, ...]:
  """Display names of every model type, for --help ('BERT', 'GPT-2', 'Llama', 'Mistral', 'RoBERTa')."""
  return tuple(sorted({t for f in registered() for t in f.TITLES}, key=str.lower))


def by_name(name: str):
  """The family called `name` (--family)."""
  for fam in registered():
    if fam.NAME == name:
      return fam
  raise ConversionError(f'--family {name!r}: expected one of {", ".join(names())}')


def family_for(model_type: str | None):
  """The family that reads config.json's `model_type` (one line naming the registered ones if none does)."""
  for fam in registered():
    if model_type in fam.MODEL_TYPES:
      return fam
  from fmjax.convert.families import moe_experts  # pylint: disable=import-outside-toplevel
  why = moe_experts.unsupported(model_type)       # an MoE design fmjax lacks: say what it lacks
  if why:
    raise ConversionError(why)
  raise ConversionError(f'config.json: model_type={model_type!r} is not supported '
                        f'(supported: {", ".join(model_types())})')


def model_type_of(hf_config: dict) -> str | None:
  """config.json's model_type, or without one the type its `architectures` class starts with."""
  kind = hf_config.get('model_type')
  if kind is None:
    archs = [a.lower() for a in hf_config.get('architectures') or [] if isinstance(a, str)]
    longest_first = sorted(model_types(), key=len, reverse=True)
    kind = next((t for a in archs for t in longest_first if a.startswith(t.replace('_', ''))), None)  # Qwen3Moe
  return kind


def pick_family(model_cfg, name: str | None = None):
  """The family an fmjax model config exports as (checked against an explicit --family `name`)."""
  if name:
    fam = by_name(name)
    why = fam.mismatch(model_cfg)
    if why:
      raise ConversionError(f'--family {name} contradicts the checkpoint model config: {why}')
    return fam
  reasons = {}
  for fam in registered():
    reasons[fam.NAME] = fam.mismatch(model_cfg)
    if reasons[fam.NAME] is None:
      return fam
  raise ConversionError('the model matches no Hugging Face family: ' +
                        '; '.join(f'{k}: {v}' for k, v in reasons.items()))
