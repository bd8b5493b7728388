"""Safetensors I/O for Hugging Face model directories: lazy reads, sharded writes, no pickles."""

from __future__ import annotations

import json
import os

import numpy as np

from fmjax.convert import output
from fmjax.convert.mapping import ConversionError

try:
  from safetensors import safe_open
  from safetensors.numpy import save_file
except ImportError:  # only the Hugging Face conversions need it
  safe_open = save_file = None

INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise ConversionError(f'{hf_dir} has no config.json; pass a Hugging Face model directory')
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f'{path} is not valid JSON ({e.msg}, line {e.lineno}); fix or re-save it') from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConversionError(f'cannot read {path}: {getattr(e, "strerror", None) or e}') from None
  if not isinstance(record, dict):
    raise ConversionError(f'{path} is not a JSON object; expected a Hugging Face config.json')
  return record


def _open_safetensors(path: str):
  """safe_open, with a damaged file (truncated, bad header) as one line naming it."""
  try:
    return safe_open(path, 'numpy')
  except Exception as e:  # noqa: BLE001 - SafetensorError and OS errors alike
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(f'{path} cannot be read as safetensors ({reason}): the file is damaged or truncated; '
                          'download it again') from None


def _need_safetensors() -> None:
  if safe_open is None:
    raise ConversionError('Hugging Face conversion needs safetensors: pip install "fmjax[hf]"')


class SafetensorsReader:
  """Tensors of a HF model directory by name, read one at a time (memory-mapped) as NumPy arrays."""

  def __init__(self, hf_dir: str):
    _need_safetensors()
    self.dir = hf_dir
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
      try:
        with open(index, encoding='utf-8') as f:
          self.files = dict(json.load(f)['weight_map'])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConversionError(f'{index} is not a valid safetensors index (no weight_map); re-save the model') from None
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
      with _open_safetensors(os.path.join(hf_dir, SINGLE)) as f:
        self.files = {k: SINGLE for k in f.keys()}
    else:
      pickled = [n for n in os.listdir(hf_dir) if n.endswith(('.bin', '.pt', '.pth'))]
      hint = f' ({", ".join(pickled)} are pickles and are never read; re-save with safe_serialization=True)' \
          if pickled else ''
      raise ConversionError(f'{hf_dir} has no {SINGLE} or {INDEX}{hint}')
    self._open = {}

  def names(self) -> set:
    return set(self.files)

  def _handle(self, file: str):
    if file not in self._open:
      path = os.path.join(self.dir, file)
      if not os.path.isfile(path):
        raise ConversionError(f'{INDEX} names {file}, which is missing from {self.dir}')
      self._open[file] = _open_safetensors(path)
    return self._open[file]

  def shape(self, name: str) -> tuple:
    return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    try:
      return self._handle(self.files[name]).get_tensor(name)
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001 - a tensor whose bytes are missing (truncated file)
      raise ConversionError(f'tensor {name} in {os.path.join(self.dir, self.files[name])} cannot be read '
                            f'({str(e).strip().splitlines()[0]}): the file is damaged or truncated') from None

  def close(self) -> None:
    self._open.clear()


def plan_shards(sizes: dict, max_bytes: int) -> list[list[str]]:
  """Group tensor names (in order) into shards of at most max_bytes (a larger tensor gets its own)."""
  shards, current, used = [], [], 0
  for name, size in sizes.items():
    if current and used + size > max_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += size
  if current:
    shards.append(current)
  return shards


def write_shards(out_dir: str, shards: list[list[str]], produce, metadata: dict | None = None) -> list[str]:
  """Write each shard; `produce(name)` returns one tensor at a time. Returns the file names.

  One shard -> model.safetensors; more -> model-0000k-of-0000n.safetensors plus the index.
  """
  _need_safetensors()
  n = len(shards)
  files = [SINGLE] if n == 1 else [f'model-{k + 1:05d}-of-{n:05d}.safetensors' for k in range(n)]
  weight_map, total = {}, 0
  for names, file in zip(shards, files):
    tensors = {name: np.ascontiguousarray(produce(name)) for name in names}
    total += sum(t.nbytes for t in tensors.values())
    save_file(tensors, os.path.join(out_dir, file), metadata={'format': 'pt', **(metadata or {})})
    output.as_created(os.path.join(out_dir, file))   # safetensors writes 0600
    weight_map.update({name: file for name in names})
    del tensors
  if n > 1:
    with open(os.path.join(out_dir, INDEX), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return files


def parse_size(text: str) -> int:
  """'5GB', '500MB', '10KiB', '123' -> bytes."""
  units = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}
  t = text.strip().upper()
  num = t.rstrip('KMGIB')
  try:
    value, unit = float(num), t[len(num):]
    return int(value * units[unit])
  except (ValueError, KeyError):
    raise ConversionError(f'--max-shard-size {text!r}: expected a size like 5GB, 500MB or 1000000') from None
