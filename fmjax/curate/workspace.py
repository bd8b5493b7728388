"""The output directory of a curation: never clobbered, resumable, inputs frozen at the first run.

OUT holds the curated shards (*.jsonl.gz), the report, and `.curate/` (config.json, the input
lists, intermediate shards, datatrove logs and completion markers). A rerun with the same
config resumes; anything else in a non-empty OUT is refused unless --overwrite.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_collections

from fmjax.curate.pipeline import work_dir
from fmjax.data.documents import resolve_files
from fmjax.errors import UserError

_JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.json', '.json.gz')


class OutputError(UserError):
  """The output directory cannot be used as asked."""


def _config_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def prepare(cfg: ml_collections.ConfigDict, overwrite: bool) -> bool:
  """Make OUT ready; True when this resumes an earlier run of the same config."""
  out, saved = cfg.output, work_dir(cfg, 'config.json')
  if os.path.exists(out) and not os.path.isdir(out):
    raise OutputError(f'output {out} is a file, not a directory: choose a directory')
  existing = os.listdir(out) if os.path.isdir(out) else []
  if existing and overwrite:
    _check_safe_to_delete(out)
    for name in existing:
      path = os.path.join(out, name)
      shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    existing = []
  if existing:
    if not os.path.isfile(saved):
      raise OutputError(f'output directory {out} is not empty: pass --overwrite to replace its contents '
                        'or choose an empty directory')
    with open(saved) as f:
      if f.read() != _config_json(cfg):
        raise OutputError(f'{out} holds a curation with a different config ({saved}): pass --overwrite to '
                          'start again, or rerun with the same config to resume')
    return True
  os.makedirs(work_dir(cfg), exist_ok=True)
  with open(saved, 'w') as f:
    f.write(_config_json(cfg))
  return False


def _check_safe_to_delete(out: str) -> None:
  """Refuse --overwrite of a directory that is obviously not a curation output."""
  real = os.path.realpath(out)
  if real in ('/', os.path.realpath(os.path.expanduser('~')), os.path.realpath(os.getcwd())):
    raise OutputError(f'refusing to --overwrite {out}: choose a dedicated output directory')


def classify(paths: list[str], input_format: str) -> tuple[list[str], list[str]]:
  """(text files, jsonl files) of the input paths."""
  if input_format != 'auto':
    return (paths, []) if input_format == 'text' else ([], paths)
  jsonl = [p for p in paths if p.endswith(_JSONL_SUFFIXES)]
  chosen = set(jsonl)
  return [p for p in paths if p not in chosen], jsonl


def resolve_inputs(cfg: ml_collections.ConfigDict) -> dict:
  """The input files of cfg.input: {'root', 'text': [relative paths], 'jsonl': [...]}; none inside OUT."""
  paths = _outside_output(resolve_files(cfg.input, what='input'), cfg.output)
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  text, jsonl = classify(paths, cfg.input_format)
  return {'root': root, 'text': [os.path.relpath(p, root) for p in text],
          'jsonl': [os.path.relpath(p, root) for p in jsonl]}


def freeze_inputs(cfg: ml_collections.ConfigDict, resumed: bool) -> dict:
  """The input lists of this run: written at the first run, read back when resuming (files added later
  are not picked up halfway through a curation)."""
  folder = work_dir(cfg, 'inputs')
  index = os.path.join(folder, 'inputs.json')
  if resumed and os.path.isfile(index):
    with open(index) as f:
      return json.load(f)
  inputs = resolve_inputs(cfg)
  os.makedirs(folder, exist_ok=True)
  for kind in ('text', 'jsonl'):
    with open(os.path.join(folder, f'{kind}.txt'), 'w') as f:
      f.write(''.join(p + '\n' for p in inputs[kind]))
  with open(index, 'w') as f:
    json.dump(inputs, f)
  return inputs


def eval_paths(cfg: ml_collections.ConfigDict) -> list[str]:
  """The decontamination eval files ([] when off)."""
  if not cfg.decontaminate.eval_files:
    return []
  return _outside_output(resolve_files(cfg.decontaminate.eval_files, what='decontaminate.eval_files'), cfg.output)


def _outside_output(paths: list[str], out: str) -> list[str]:
  """The paths, none of which may lie inside OUT (--overwrite would delete them)."""
  inside = [p for p in paths if os.path.commonpath([p, out]) == out]
  if inside:
    raise OutputError(f'input {inside[0]} lies inside the output directory {out}: choose another output')
  return paths

