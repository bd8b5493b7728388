"""Global batches whose order does not depend on the number of processes.

The train split is read as `num_streams` independent document streams (stream s reads
documents s, s+S, ...). Each stream fills a fixed block of rows of every global batch, and a
process reads only the streams whose rows it owns. The global batch sequence is therefore a
function of (data, seed, num_streams, global batch size), not of the process count, and a
checkpoint's data state (per stream) restores under any process count.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Callable

import numpy as np

from fmjax.runtime import paths
from fmjax.data.errors import DataError

_MOVE_ASIDE = 'the checkpoint is damaged: move {0} aside (mv {0} {0}.bad) to resume from the previous one'


def owned_streams(num_streams: int, process_index: int, process_count: int) -> range:
  """The streams whose rows belong to this process."""
  if num_streams % process_count:
    raise DataError(f'data.num_streams={num_streams} must be a multiple of the process count {process_count}')
  per = num_streams // process_count
  return range(process_index * per, (process_index + 1) * per)


class StreamSetIterator:
  """Concatenates the batches of several per-stream iterators (rows in stream order)."""

  def __init__(self, make_stream: Callable[[int, int], object], streams: range, num_streams: int,
               batch_size: int):
    if batch_size % len(streams):
      raise DataError(f'the per-process batch {batch_size} must divide over the {len(streams)} data streams '
                      f'of this process (data.num_streams={num_streams})')
    rows = batch_size // len(streams)
    self.num_streams = num_streams
    self._its = {s: make_stream(s, rows) for s in streams}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._its.values()]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    """JSON bytes (the protocol of Grain's Orbax handler for non-dataset iterators)."""
    state = {'num_streams': self.num_streams, 'streams': {str(s): it.get_state() for s, it in self._its.items()}}
    return json.dumps(state).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    """Restore every owned stream; a malformed state is a one-line DataError."""
    if isinstance(state, (bytes, str)):
      state = _parse_state(state)
    if not isinstance(state, dict) or not isinstance(state.get('streams'), dict):
      raise DataError("the checkpoint's data state is unreadable: it has no 'streams' mapping; the checkpoint "
                      'is damaged: move it aside to resume from the previous one')
    if _as_int(state.get('num_streams')) != self.num_streams:
      raise DataError(f'the checkpoint\'s data state has num_streams={state.get("num_streams")} but this run '
                      f'uses {self.num_streams}; set --config.data.num_streams={state.get("num_streams")}')
    for s, it in self._its.items():
      if str(s) not in state['streams']:
        raise DataError(f'the checkpoint\'s data state has no entry for stream {s}')
      try:
        it.set_state(state['streams'][str(s)])
      except DataError:
        raise
      except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"the checkpoint's data state is unreadable: stream {s} has a malformed entry "
                        f'({type(e).__name__}: {e}); the checkpoint is damaged: move it aside to resume from '
                        'the previous one') from None

  def start_prefetch(self) -> None:
    """Part of Grain's iterator protocol; the streams prefetch on their own."""

  def close(self) -> None:
    for it in self._its.values():
      if hasattr(it, 'close'):
        it.close()


def read_saved_state(directory: str) -> dict:
  """Merge the per-process data-state files of a checkpoint item (any process count wrote them).

  A missing, unreadable or malformed file is a one-line DataError naming it.
  """
  files = sorted(paths.join(directory, n) for n in paths.listdir(directory)
                 if fnmatch.fnmatch(n, 'process_*-of-*.json'))
  if not files:
    raise DataError(f'no data-iterator state in {directory}; {_MOVE_ASIDE.format(paths.dirname(directory))}')
  merged: dict = {'streams': {}}
  for path in files:
    try:
      state = _parse_state(paths.read_bytes(path), path)
    except OSError as e:
      raise DataError(f"the checkpoint's data state {path} cannot be read ({e.strerror})") from None
    if not isinstance(state, dict) or not isinstance(state.get('streams', {}), dict):
      raise DataError(f"the checkpoint's data state {path} is unreadable: not a mapping with 'streams'; "
                      f'{_MOVE_ASIDE.format(paths.dirname(directory))}')
    merged['num_streams'] = state.get('num_streams')
    merged['streams'].update(state.get('streams', {}))
  return merged


def _parse_state(raw: bytes | str, path: str | None = None):
  """JSON of a saved data state; garbage is a DataError naming the file (`path`, when read from one)."""
  try:
    return json.loads(raw)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    detail = f'{e.msg} at line {e.lineno} column {e.colno}' if isinstance(e, json.JSONDecodeError) else 'not UTF-8'
    todo = _MOVE_ASIDE.format(paths.dirname(paths.dirname(path))) if path else \
        'the checkpoint is damaged: move it aside to resume from the previous one'
    raise DataError(f"the checkpoint's data state{' ' + path if path else ''} is unreadable (not valid JSON: "
                    f'{detail}); {todo}') from None


def _as_int(value):
  try:
    return int(value)
  except (TypeError, ValueError):
    return None
