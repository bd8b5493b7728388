"""What a compiled multislice TPU program sends across slices (the data-centre network, DCN).

libtpu compiles a multislice program per slice: collectives inside a slice stay ordinary all-reduce /
all-gather ops, and the part that crosses slices becomes host transfers to the megascale runtime (send
and recv ops tagged `_xla_megascale_transfer_type`, e.g. ALL_REDUCE). `dcn_transfers(hlo_text)` lists the
sends: their transfer type and the elements and bytes they carry, so a plan (and a test) can say what the
DCN carries per step: gradient reductions only, for data parallelism across slices.
"""

from __future__ import annotations

import dataclasses
import math
import re

_SEND = re.compile(r'= \((\w+)\[([\d,]*)\][^)]*\) send\(')
_KIND = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
          'f64': 8, 's64': 8, 'u64': 8}


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One send across slices: its kind (ALL_REDUCE, ALL_GATHER, ...), dtype and element count."""
  kind: str
  dtype: str
  elements: int

  @property
  def bytes(self) -> int:
    return self.elements * _BYTES.get(self.dtype, 4)


def dcn_transfers(hlo_text: str) -> list[Transfer]:
  """The cross-slice sends of a compiled program's HLO text (`compiled.as_text()`); [] for one slice."""
  out = []
  for line in hlo_text.splitlines():
    if '_xla_megascale_transfer_type' not in line:
      continue
    send = _SEND.search(line)
    if send is None:   # recv and the *-done ops describe the same transfer
      continue
    dims = [int(d) for d in send.group(2).split(',') if d]
    out.append(Transfer(_KIND.search(line).group(1), send.group(1), math.prod(dims)))
  return out


def summary(transfers: list[Transfer]) -> dict[str, int]:
  """{kind: bytes} sent across slices per step."""
  out: dict[str, int] = {}
  for t in transfers:
    out[t.kind] = out.get(t.kind, 0) + t.bytes
  return out
