"""A validation split that exists whenever it can: the hold-out of a local build whose hash split is empty.

A built local dataset puts a document in 'validation' when the SHA-1 of its text is below
`validation_fraction` (fmjax.data.local_build). On a small corpus that can hold out nothing (60 files
at 0.02 keep all 60 about a third of the time). Then, with validation_fraction > 0 and no eval files:

- two or more documents: the document whose SHA-1 is smallest (the one a slightly larger fraction
  would take first) is held out, with every copy of its text; the train split keeps the rest;
- a single document: its last `validation_fraction` of characters (at least one; cut at the line
  break nearest to that point in its second half, else at a space) is held out;
- otherwise (all documents are copies of one text, or one document too short to cut) nothing is
  held out, and the reason is kept for the error of an empty eval split.

The plan is a pure function of the built train split (its documents in stored order), computed once
per dataset directory and saved beside the manifest as `holdout.json`, so a cached build gets the same
split; builds whose hash split is non-empty are untouched (their splits, and resumed runs, stay exact).
`SplitView` presents a split with the plan applied, as a random-access sequence of `str`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
from typing import Sequence

HOLDOUT = 'holdout.json'
_VERSION = 1
_SCAN = 1024    # documents read per request while planning


@dataclasses.dataclass
class Plan:
  """held: train-split indices moved to validation; cut: (index, offset) of the one document whose
  text from `offset` on is validation; what: the held-out part, in words; why_not: when nothing is."""
  held: list[int] = dataclasses.field(default_factory=list)
  cut: tuple[int, int] | None = None
  what: str = ''
  why_not: str = ''

  @property
  def holds_out(self) -> bool:
    return bool(self.held) or self.cut is not None


def digest(text: str) -> bytes:
  """The SHA-1 that local_build.is_validation compares against the fraction."""
  return hashlib.sha1(text.encode('utf-8', errors='surrogatepass')).digest()


def _opening(text: str, words: int = 6) -> str:
  head = ' '.join(text.split()[:words])
  return head if len(head) <= 60 else head[:57] + '...'


def cut_offset(text: str, fraction: float) -> int | None:
  """Where the held-out tail of a single document starts, or None when it cannot be cut in two."""
  end = len(text.rstrip())
  target = end - max(1, round(fraction * end))
  for sep in ('\n', ' '):   # the nearest break in the second half, the tail keeping its last character
    places = [p + 1 for p in (text.rfind(sep, end // 2, target), text.find(sep, max(target, end // 2), end - 1))
              if p >= 0]
    if places:
      target = min(places, key=lambda p: (abs(p - target), p))
      break
  if target <= 0 or not text[:target].strip() or not text[target:].strip():
    return None
  return target


def plan(documents: Sequence[str], fraction: float, describe=None) -> Plan:
  """The hold-out of a train split whose hash split left validation empty (see the module docstring).

  `describe(indices, text)` may name the held-out documents (e.g. their files)."""
  n = len(documents)
  if n == 0:
    return Plan(why_not='there are no documents')
  if n == 1:
    text = documents[0]
    offset = cut_offset(text, fraction)
    if offset is None:
      return Plan(why_not=f'the only document ({len(text)} characters) is too short to cut in two')
    line = text.count('\n', 0, offset) + 1
    return Plan(cut=(0, offset), what=f'the last {len(text) - offset} of the {len(text)} characters (from line '
                                      f'{line}) of the only document')
  best, held = None, []
  for start in range(0, n, _SCAN):
    texts = _get(documents, range(start, min(start + _SCAN, n)))
    for i, text in enumerate(texts, start):
      d = digest(text)
      if best is None or d < best[0]:
        best, held = (d, text), [i]
      elif d == best[0]:
        held.append(i)
  if len(held) == n:
    return Plan(why_not=f'all {n} documents are the same text, so any held-out one would also be trained on')
  text = best[1]
  named = describe(held, text) if describe else ''
  copies = f' and its {len(held) - 1} copies' if len(held) > 1 else ''
  return Plan(held=held, what=f'the document whose hash is smallest, {named or f"number {held[0]}"} '
                              f'("{_opening(text)}"){copies},')


def _get(documents, indices) -> list[str]:
  getitems = getattr(documents, '__getitems__', None)
  return list(getitems(list(indices))) if getitems else [documents[i] for i in indices]


def load(directory: str) -> Plan | None:
  """The plan saved in a dataset directory, or None."""
  try:
    with open(os.path.join(directory, HOLDOUT), encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(saved, dict) or saved.get('version') != _VERSION:
    return None
  cut = saved.get('cut')
  return Plan(held=list(saved.get('held', [])), cut=tuple(cut) if cut else None, what=saved.get('what', ''),
              why_not=saved.get('why_not', ''))


def save(directory: str, p: Plan) -> None:
  """Write the plan atomically (processes sharing the cache compute the same one); a read-only cache
  just keeps it in memory."""
  body = {'version': _VERSION, 'held': p.held, 'cut': list(p.cut) if p.cut else None, 'what': p.what,
          'why_not': p.why_not}
  tmp = os.path.join(directory, f'{HOLDOUT}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(body, f)
    os.replace(tmp, os.path.join(directory, HOLDOUT))
  except OSError:
    try:
      os.remove(tmp)
    except OSError:
      pass


class SplitView:
  """A train split with a plan applied: `part='train'` drops the held documents and keeps the head of a
  cut one; `part='validation'` is the held documents (in order), then the tail of a cut one."""

  def __init__(self, documents: Sequence[str], p: Plan, part: str):
    self._docs, self._part = documents, part
    self._held = sorted(p.held)
    self._cut = p.cut
    if part == 'train':
      self._len = len(documents) - len(self._held)
    else:
      self._len = len(self._held) + (1 if p.cut else 0)

  def __len__(self) -> int:
    return self._len

  def _index(self, i: int) -> int:
    if self._part == 'validation':
      return self._held[i] if i < len(self._held) else self._cut[0]
    # the i-th index not held: skip past the held ones at or below it
    j = i
    while True:
      k = bisect.bisect_right(self._held, j)
      if i + k == j:
        return j
      j = i + k

  def _piece(self, i: int, text: str) -> str:
    if self._cut is None or i != self._cut[0]:
      return text
    return text[:self._cut[1]] if self._part == 'train' else text[self._cut[1]:]

  def __getitem__(self, i: int) -> str:
    if not -self._len <= i < self._len:
      raise IndexError(i)
    j = self._index(i % self._len)
    return self._piece(j, self._docs[j])

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    mapped = [self._index(i) for i in indices]
    return [self._piece(j, t) for j, t in zip(mapped, _get(self._docs, mapped))]

  def __repr__(self) -> str:
    return f'SplitView({self._docs!r}, part={self._part!r})'
