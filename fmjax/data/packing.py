"""Concat-then-split packing of token streams into fixed rows, with a JSON-safe state.

Grain 0.2.18's `ConcatThenSplitIterDataset` keeps tuples in its state; after the JSON round
trip of `grain.checkpoint` they come back as lists and a restored iterator skips a document.
This packer keeps only the parent's state before the current document and an offset in it.

Each row has exactly `length` tokens (the last row of a finite stream is padded with
segment id 0); a document continued from the previous row starts at position 0 again.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


class _PackIterator(grain.DatasetIterator):
  """Fills rows from {'tokens': ids} elements; splits documents across rows."""

  def __init__(self, parent: grain.DatasetIterator, length: int, pad_id: int):
    super().__init__(parent)
    self._length, self._pad_id = length, pad_id
    self._arange = np.arange(length, dtype=np.int32)
    self._doc: np.ndarray | None = None      # current document (partly consumed)
    self._doc_state: Any = None              # parent state before it
    self._offset = 0                         # tokens of it already emitted

  def _next_doc(self) -> bool:
    self._doc_state = self._parent.get_state()
    try:
      self._doc = np.asarray(next(self._parent)['tokens'], dtype=np.int32)
    except StopIteration:
      self._doc = None
      return False
    self._offset = 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    length = self._length
    tokens = np.full(length, self._pad_id, dtype=np.int32)
    segment_ids = np.zeros(length, dtype=np.int32)
    positions = np.zeros(length, dtype=np.int32)
    filled, segment = 0, 0
    while filled < length:
      if self._doc is None or self._offset >= len(self._doc):
        if not self._next_doc():
          if filled == 0:
            raise StopIteration
          break
        continue
      take = min(length - filled, len(self._doc) - self._offset)
      segment += 1
      end = filled + take
      tokens[filled:end] = self._doc[self._offset:self._offset + take]
      segment_ids[filled:end] = segment
      positions[filled:end] = self._arange[:take]
      filled, self._offset = end, self._offset + take
    return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None or self._offset >= len(self._doc):
      return {'parent': self._parent.get_state(), 'offset': -1}
    return {'parent': self._doc_state, 'offset': self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._doc, self._offset = None, 0
    if state['offset'] >= 0:
      if not self._next_doc():
        raise ValueError(f'cannot restore packing state {state}: the parent stream ended')
      self._offset = state['offset']


class PackIterDataset(grain.IterDataset):
  """Concatenate the 'tokens' of the parent's elements and cut rows of `length` tokens."""

  def __init__(self, parent: grain.IterDataset, length: int, pad_id: int = 0):
    super().__init__(parent)
    self._length, self._pad_id = length, pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._length, self._pad_id)

  def __str__(self) -> str:
    return f'PackIterDataset(length={self._length})'
