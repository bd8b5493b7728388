"""What a compiled multislice TPU program sends across slices (the data-centre network, DCN).

libtpu compiles a multislice program per slice: collectives inside a slice stay ordinary all-reduce /
all-gather ops, and the part that crosses slices becomes host transfers to the megascale runtime (send
and recv ops tagged `_xla_megascale_transfer_type`, e.g. ALL_REDUCE). `dcn_transfers(hlo_text)` lists the
sends: their transfer type, the elements and bytes they carry and how many times a step runs them (a send
inside a while loop, e.g. the scanned layers' backward pass, runs once per iteration: the loop's bound
is read from its condition), so a plan (and a test) can say what the DCN carries per step: gradient
reductions only, for data parallelism across slices.
"""

from __future__ import annotations

import dataclasses
import math
import re

_SEND = re.compile(r'= \((\w+)\[([\d,]*)\].*?\) send\(')
_KIND = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_HEADER = re.compile(r'^(ENTRY )?%(\S+) .*\{$')
_WHILE = re.compile(r'condition=%([^\s,]+), body=%([^\s,]+)')
_CALLS = re.compile(r'(?:calls|to_apply|true_computation|false_computation)=%([^\s,]+)|branch_computations=\{([^}]*)\}')
_BOUND = re.compile(r's32\[\][^=]*constant\((\d+)\)')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
          'f64': 8, 's64': 8, 'u64': 8}


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One send across slices: its kind (ALL_REDUCE, ALL_GATHER, ...), dtype, element count and how many times
  a step runs it."""
  kind: str
  dtype: str
  elements: int
  runs: int = 1

  @property
  def per_step(self) -> int:
    """Elements sent per step (all its runs)."""
    return self.elements * self.runs

  @property
  def bytes(self) -> int:
    """Bytes sent per step (all its runs)."""
    return self.elements * self.runs * _BYTES.get(self.dtype, 4)


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its lines}, and the entry computation's name."""
  comps: dict[str, list[str]] = {}
  entry, current = '', None
  for line in hlo_text.splitlines():
    head = _HEADER.match(line)
    if head:
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif line.rstrip() == '}':
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _runs_per_step(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times a step runs each computation: a while body its condition's bound times its parent's."""
  parents: dict[str, list[tuple[str, int]]] = {}
  for name, lines in comps.items():
    for line in lines:
      loop = _WHILE.search(line)
      if loop:
        bounds = [int(b) for b in _BOUND.findall('\n'.join(comps.get(loop.group(1), [])))]
        parents.setdefault(loop.group(2), []).append((name, max(bounds, default=1)))
        parents.setdefault(loop.group(1), []).append((name, max(bounds, default=1)))
      for called, branches in _CALLS.findall(line):
        for c in ([called] if called else [b.strip().lstrip('%') for b in branches.split(',')]):
          parents.setdefault(c, []).append((name, 1))
  memo: dict[str, int] = {entry: 1}

  def runs(name: str, seen=()) -> int:
    if name not in memo:
      memo[name] = max((trip * runs(p, seen + (name,)) for p, trip in parents.get(name, []) if p not in seen),
                       default=1)
    return memo[name]
  return {name: runs(name) for name in comps}


def dcn_transfers(hlo_text: str) -> list[Transfer]:
  """The cross-slice sends of a compiled program's HLO text (`compiled.as_text()`); [] for one slice."""
  comps, entry = _computations(hlo_text)
  per_step = _runs_per_step(comps, entry)
  out = []
  for name, lines in comps.items():
    for line in lines:
      if '_xla_megascale_transfer_type' not in line:
        continue
      send = _SEND.search(line)
      if send is None:   # recv and the *-done ops describe the same transfer
        continue
      dims = [int(d) for d in send.group(2).split(',') if d]
      out.append(Transfer(_KIND.search(line).group(1), send.group(1), math.prod(dims), per_step[name]))
  return out


def summary(transfers: list[Transfer]) -> dict[str, int]:
  """{kind: bytes} sent across slices per step."""
  out: dict[str, int] = {}
  for t in transfers:
    out[t.kind] = out.get(t.kind, 0) + t.bytes
  return out
