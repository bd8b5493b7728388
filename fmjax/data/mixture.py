"""Weighted mixtures of sources: `data.mixture='web:0.7:/data/web/*.jsonl.zst,code:0.3:/data/code/*.parquet'`.

Each entry is `name:weight:spec`; spec is a glob (its kind from the file names: .jsonl/.json/.ndjson
-> jsonl, .parquet -> parquet, else text; compressed .gz/.zst too), `KIND:glob` to say the kind
(text | jsonl | parquet), `tfds:NAME[:VERSION]` for a prepared TFDS dataset, or `stdlib`. Weights
are relative (normalised to sum 1) and are shares of rows (of tokens, with packing). The other
data.* options (jsonl_field, split_by, validation_fraction, ...) apply to every source.

Which source fills a row of the global batch is a pure function of the row's global index
n = step * global_rows + row: the low-discrepancy (golden-ratio Weyl) sequence
u_n = frac(n / phi + offset(seed)) picks source k when u_n falls in its slice of the cumulative
weights. Shares are therefore exact within a row or two over any window, need no state, and do
not depend on the process or worker count; each source is read as independent row streams like
fmjax.data.stream_set, and the saved state is the step, the rows per source and each stream's
position. Weights may change on resume (logged); sources may be added (start fresh) or removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Callable, Iterator

import numpy as np

from fmjax.data import batches as batches_lib
from fmjax.data import formats
from fmjax.data.errors import DataError

log = logging.getLogger(__name__)
_KINDS = ('text', 'jsonl', 'parquet', 'tfds')
_GOLDEN = 0x9E3779B97F4A7C15   # 2**64 / phi, odd: n * _GOLDEN mod 2**64 is a Weyl sequence
_MASK = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class Source:
  """One mixture entry: name, relative weight, kind (stdlib | text | jsonl | parquet | tfds), glob or TFDS name."""
  name: str
  weight: float
  kind: str
  spec: str


def parse(text: str) -> list[Source]:
  """The sources of a `data.mixture` string; a malformed entry is a one-line DataError."""
  sources = []
  for entry in (e.strip() for e in text.split(',')):
    if not entry:
      continue
    parts = entry.split(':', 2)
    if len(parts) < 3 or not parts[0] or not parts[2]:
      raise DataError(f'data.mixture entry {entry!r} is not NAME:WEIGHT:SPEC, e.g. web:0.7:/data/web/*.jsonl.gz')
    name, weight, spec = parts
    try:
      w = float(weight)
    except ValueError:
      w = -1.0
    if not w > 0 or w == float('inf'):
      raise DataError(f'data.mixture entry {entry!r}: the weight {weight!r} must be a positive number')
    kind, _, rest = spec.partition(':')
    if spec == 'stdlib':
      kind, spec = 'stdlib', ''
    elif kind in _KINDS and rest:
      spec = rest
    else:
      kind = formats.kind_of(spec)
    sources.append(Source(name, w, kind, spec))
  names = [s.name for s in sources]
  if len(set(names)) != len(names):
    raise DataError(f'data.mixture names must be unique, got {", ".join(names)}')
  return sources


def source_config(data_cfg, source: Source):
  """The data config of one source (the shared options, its own kind and files)."""
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mixture = ''
    cfg.source = source.kind
    if source.kind == 'tfds':
      cfg.tfds_name = source.spec
    else:
      cfg.files = source.spec
    if data_cfg.get('eval_files'):   # the eval files are the validation split: sources all train
      cfg.eval_files, cfg.validation_fraction = '', 0.0
  return cfg


def _offset(seed: int) -> int:
  return int.from_bytes(hashlib.sha256(f'fmjax-mixture-{seed}'.encode()).digest()[:8], 'big')


def row_sources(first_row: int, count: int, weights: list[float], seed: int) -> np.ndarray:
  """The source index of global rows first_row .. first_row+count-1 (pure in its arguments)."""
  n = np.arange(first_row, first_row + count, dtype=np.uint64)
  with np.errstate(over='ignore'):
    u = n * np.uint64(_GOLDEN) + np.uint64(_offset(seed) & _MASK)
  edges = np.cumsum(np.asarray(weights, np.float64) / sum(weights))[:-1] * 2.0**64
  return np.searchsorted(edges, u.astype(np.float64), side='right').astype(np.int32)


class MixtureIterator:
  """Global batches of a mixture; this process's rows (its streams' blocks) per step.

  `make_rows(stream, source)` gives an endless row iterator (get_state/set_state) of one source's
  documents `stream, stream + num_streams, ...`.
  """

  def __init__(self, make_rows: Callable[[int, Source], Iterator], sources: list[Source], streams: range,
               num_streams: int, batch_size: int, process_count: int, seed: int):
    if batch_size % len(streams):
      raise DataError(f'the per-process batch {batch_size} must divide over the {len(streams)} data streams '
                      f'of this process (data.num_streams={num_streams})')
    self.sources, self.num_streams, self.seed = sources, num_streams, seed
    self._rows_per_stream = batch_size // len(streams)
    self._global_rows = batch_size * process_count
    self._streams = streams
    self._its = {s: {src.name: make_rows(s, src) for src in sources} for s in streams}
    self.step = 0
    self.rows_seen = dict.fromkeys((s.name for s in sources), 0)   # global rows per source so far
    self._history: dict[int, dict[str, int]] = {}                    # step -> rows_seen, the last few

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    picks = row_sources(self.step * self._global_rows, self._global_rows, [s.weight for s in self.sources], self.seed)
    rows = []
    for s in self._streams:
      start = s * self._rows_per_stream
      for k in picks[start:start + self._rows_per_stream]:
        rows.append(next(self._its[s][self.sources[k].name]))
    for k, n in zip(*np.unique(picks, return_counts=True)):
      self.rows_seen[self.sources[k].name] += int(n)
    self.step += 1
    self._history[self.step] = dict(self.rows_seen)
    self._history.pop(self.step - 8, None)
    stacked = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
    return batches_lib.model_batch(stacked)

  def rows_seen_at(self, step: int) -> dict[str, int]:
    """Global rows per source up to `step` (one of the last few steps read; else the latest)."""
    return self._history.get(step, self.rows_seen)

  def shares(self) -> dict[str, float]:
    """Each source's share of the global rows so far."""
    total = sum(self.rows_seen.values()) or 1
    return {name: n / total for name, n in self.rows_seen.items()}

  def get_state(self) -> bytes:
    mixture = {'step': self.step, 'weights': {s.name: s.weight for s in self.sources}, 'rows': self.rows_seen}
    streams = {str(s): dict(mixture, sources={name: it.get_state() for name, it in its.items()})
               for s, its in self._its.items()}
    return json.dumps({'num_streams': self.num_streams, 'streams': streams}).encode()

  def set_state(self, state) -> None:
    """Restore every owned stream (see stream_set.StreamSetIterator.set_state for the format checks)."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    streams = state.get('streams') if isinstance(state, dict) else None
    if not isinstance(streams, dict):
      raise DataError("the checkpoint's data state is unreadable: it has no 'streams' mapping; the checkpoint "
                      'is damaged: move it aside to resume from the previous one')
    if str(state.get('num_streams')) != str(self.num_streams):
      raise DataError(f'the checkpoint\'s data state has num_streams={state.get("num_streams")} but this run '
                      f'uses {self.num_streams}; set --config.data.num_streams={state.get("num_streams")}')
    first = streams.get(str(self._streams[0]))
    if not isinstance(first, dict) or 'sources' not in first:
      raise DataError("the checkpoint's data state is not a mixture's: it was saved without data.mixture; "
                      'resume with the data options it was saved with')
    self._note_changes(first)
    for s, its in self._its.items():
      saved = streams.get(str(s), {}).get('sources', {})
      for name, it in its.items():
        if name in saved:
          it.set_state(saved[name])
    self.step = int(first['step'])
    self.rows_seen = {name: int(first.get('rows', {}).get(name, 0)) for name in self.rows_seen}

  def _note_changes(self, saved: dict) -> None:
    old, new = saved.get('weights', {}), {s.name: s.weight for s in self.sources}
    if old != new:
      log.warning('data.mixture changed on resume at step %s: weights %s -> %s (from this step on; new sources '
                  'start at their beginning, removed ones are dropped)', saved.get('step'), old, new)

  def start_prefetch(self) -> None:
    """Part of Grain's iterator protocol; the streams prefetch on their own."""

  def close(self) -> None:
    for its in self._its.values():
      for it in its.values():
        if hasattr(it, 'close'):
          it.close()
