"""A document stream whose checkpoint state does not depend on the number of Grain workers.

The state is {'next_index': documents consumed so far}. With workers, Grain's `mp_prefetch`
interleaves worker i's slice (documents i, i+n, ...) round-robin, and its own state lists
each worker's position; `set_state` rebuilds that layout from the count, so a checkpoint
saved with any worker_count restores with any other (Grain 0.2.18 state layout; tested).
"""

from __future__ import annotations

from typing import Any

import grain


def interleave_state(count: int, workers: int) -> dict[str, Any]:
  """Grain's mp_prefetch state after `count` elements of an endless stream over `workers`."""
  return {
      'next_index_in_cycle': count % workers,
      'next_index_in_datasets': workers,
      'iterators_in_use_indices': list(range(workers)),
      'iterators_in_use_states': [{'next_index': max(0, (count - i + workers - 1) // workers)}
                                  for i in range(workers)],
      'exhausted': [0] * workers,
      'future_states': {},
  }


class _CountingIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, workers: int):
    super().__init__(parent)
    self._workers, self._count = workers, 0

  def __next__(self):
    element = next(self._parent)
    self._count += 1
    return element

  def get_state(self) -> dict[str, Any]:
    return {'next_index': self._count}

  def set_state(self, state: dict[str, Any]) -> None:
    count = int(state['next_index'])
    if self._workers > 0:
      self._parent.set_state(interleave_state(count, self._workers))
    else:
      self._parent.set_state({'next_index': count})
    self._count = count


class CountedStream(grain.IterDataset):
  """Wraps an endless `to_iter_dataset()` stream, optionally `mp_prefetch`ed over `workers`."""

  def __init__(self, parent: grain.IterDataset, workers: int):
    super().__init__(parent)
    self._workers = workers

  def __iter__(self) -> _CountingIterator:
    return _CountingIterator(self._parent.__iter__(), self._workers)

  def __str__(self) -> str:
    return f'CountedStream(workers={self._workers})'
