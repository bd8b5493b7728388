"""Config files in, overrides on top, JSON out: loading, `--config.a.b=c` flags, the schema check, saving."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import traceback
from typing import Any, Sequence

import ml_collections

from fmjax.config.checks import validate
from fmjax.config.errors import ConfigError
from fmjax.config.schema import base_config


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Import a `get_config()` Python file and return its ConfigDict."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location('fmjax_user_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any error in the user's file becomes one line naming it
    raise ConfigError(_file_error(path, e)) from e
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config() function')
  try:
    cfg = module.get_config()
  except Exception as e:  # noqa: BLE001
    raise ConfigError(_file_error(path, e)) from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() returned {type(cfg).__name__}, not an ml_collections.ConfigDict '
                      '(start from fmjax.config.base_config())')
  return cfg


def _file_error(path: str, error: Exception) -> str:
  """'error in config file FILE line N: SyntaxError: ...' for an exception raised while loading FILE."""
  line = None
  if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == os.path.abspath(path):
    line, text = error.lineno, error.msg
  else:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    for frame in traceback.extract_tb(error.__traceback__):
      if os.path.abspath(frame.filename) == os.path.abspath(path):
        line = frame.lineno
  where = f'{path} line {line}' if line else path
  return f'error in config file {where}: {type(error).__name__}{": " + text if text else ""}'


def _parse_value(text: str, current: Any, key: str) -> Any:
  """Parse an override string into the type of the current value."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ConfigError(f'--config.{key}: expected true/false, got {text!r}')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f'--config.{key}: expected an integer, got {text!r}') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f'--config.{key}: expected a number, got {text!r}') from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      raise ConfigError(f'--config.{key}: expected a JSON list, got {text!r}') from None
    return type(current)(_to_tuples(value) if isinstance(current, tuple) else value)
  raise ConfigError(f'--config.{key}: cannot override a value of type {type(current).__name__}')


def _to_tuples(value):
  if isinstance(value, list):
    return tuple(_to_tuples(v) for v in value)
  return value


def did_you_mean(name: str, known, prefix: str = '') -> str:
  """' (did you mean model.num_layers?)' naming the nearest of `known` (those tied nearest), or ''."""
  ratios = {k: difflib.SequenceMatcher(None, name, k).ratio() for k in known}
  best = max(ratios.values(), default=0.0)
  close = sorted(k for k, r in ratios.items() if r == best) if best >= 0.6 else []
  return f' (did you mean {" or ".join(prefix + c for c in close[:3])}?)' if close else ''


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Apply `a.b=c` strings (with or without a leading `--config.`) to cfg, checking keys and types."""
  for item in overrides:
    text = item[len('--config.'):] if item.startswith('--config.') else item
    if '=' not in text:
      raise ConfigError(f'override {item!r} must look like --config.key=value')
    key, raw = text.split('=', 1)
    parent, where = cfg, ''
    parts = key.split('.')
    for part in parts[:-1]:
      if part not in parent or not isinstance(parent[part], ml_collections.ConfigDict):
        sections = [k for k in parent.keys() if isinstance(parent[k], ml_collections.ConfigDict)]
        raise ConfigError(f'unknown config key {key!r} (no section {part!r}){did_you_mean(part, sections, where)}')
      parent, where = parent[part], f'{where}{part}.'
    leaf = parts[-1]
    if leaf not in parent:
      raise ConfigError(f'unknown config key {key!r}{did_you_mean(leaf, parent.keys(), where)}')
    if isinstance(parent[leaf], ml_collections.ConfigDict):
      raise ConfigError(f'config key {key!r} is a section; set one of its fields instead')
    value = _parse_value(raw, parent[leaf], key)
    with parent.unlocked():
      parent[leaf] = value
  return cfg


def check_schema(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = '') -> None:
  """Every key of cfg must exist in schema with a compatible type (config files can't invent keys)."""
  for key in cfg.keys():
    name = f'{prefix}{key}'
    if key not in schema:
      raise ConfigError(f'unknown config key {name!r}{did_you_mean(key, schema.keys(), prefix)}')
    value, ref = cfg[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f'config key {name!r} must be a section')
      check_schema(value, ref, name + '.')
    elif isinstance(ref, bool) != isinstance(value, bool) or (
        isinstance(ref, (int, float)) and not isinstance(value, (int, float))) or (
        isinstance(ref, str) and not isinstance(value, str)):
      raise ConfigError(f'config key {name!r} must be of type {type(ref).__name__}, got {value!r}')


def resolve(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Load a config file, check it against the schema, apply overrides and validate."""
  cfg = load_config_file(path)
  check_schema(cfg, base_config())
  cfg = apply_overrides(cfg, overrides)
  return validate(cfg)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (what each run saves in its workdir)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def save(cfg: ml_collections.ConfigDict, path: str) -> None:
  """Write the resolved config as JSON (atomically; `path` may be a URL)."""
  from fmjax.runtime import paths  # pylint: disable=import-outside-toplevel
  paths.write_text(path, to_json(cfg))
