"""Records as documents: random access to the text of a record source, as `str`."""

from __future__ import annotations

from typing import Any, Sequence


class TextSource:
  """Random access to the text feature of a record source: `len(src)`, `src[i] -> str`."""

  def __init__(self, records: Sequence[Any], feature: str | None = 'text'):
    self._records = records
    self._feature = feature

  def __len__(self) -> int:
    return len(self._records)

  def _text(self, record) -> str:
    value = record[self._feature] if self._feature is not None and isinstance(record, dict) else record
    if isinstance(value, bytes):
      return value.decode('utf-8', errors='replace')
    return str(value)

  def __getitem__(self, index: int) -> str:
    return self._text(self._records[index])

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    getitems = getattr(self._records, '__getitems__', None)
    records = getitems(indices) if getitems else [self._records[i] for i in indices]
    return [self._text(r) for r in records]

  def __repr__(self) -> str:
    return f'TextSource({self._records!r}, feature={self._feature!r})'
