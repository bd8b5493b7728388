"""IP addresses in text: found (IPv4 and IPv6), checked with `ipaddress`, redacted or kept, and counted.

datatrove's PIIFormatter finds IPv4 only, without boundaries ('v1.2.3.4.5' -> 'v<IP>.5', '10.0.0.256'
-> '<IP>6'), and by default keeps every non-global address (192.168.1.20 stayed, and was counted as
nothing). Here an address is a whole token: IPv4 as four dotted octets not inside a longer dotted or
alphanumeric run; IPv6 as colon-separated hex groups (optionally ending in an IPv4 part) that
`ipaddress` accepts, with at least three colons or a four-digit hex group holding a letter (fe80::1):
slices such as `a[1::2]`, times (12:30:45) and C++ names (std::vector) are not addresses.

Loopback and unspecified addresses (127.0.0.1, 0.0.0.0, ::1, ::) name no machine and are everywhere in
code: they are always kept. With `public_only`, every non-global address (private, link-local,
documentation ranges) is kept too. Kept addresses are counted, so a report can say what it left.
"""

from __future__ import annotations

import ipaddress
import re

_OCTET = r'(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
_IPV4 = rf'{_OCTET}(?:\.{_OCTET}){{3}}'
_IPV6 = rf'(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_IPV4}|[0-9A-Fa-f]{{1,4}})?'
IP_PATTERN = re.compile(rf'(?<![\w.:])(?:(?P<v6>{_IPV6})|(?P<v4>{_IPV4}))(?![\w:]|\.\d)')
_LETTER_GROUP = re.compile(r'(?<![0-9A-Fa-f])(?=[0-9A-Fa-f]*[A-Fa-f])[0-9A-Fa-f]{4}(?![0-9A-Fa-f])')


def parse(candidate: str, v6: bool):
  """The address a match stands for, or None when it is not one."""
  if v6 and candidate.count(':') < 3 and not _LETTER_GROUP.search(candidate):
    return None
  try:
    return ipaddress.ip_address(candidate)
  except ValueError:
    return None


def keeps(address, public_only: bool) -> bool:
  """Whether an address stays in the text: loopback/unspecified always, non-global ones with public_only."""
  if address.is_loopback or address.is_unspecified:
    return True
  return public_only and not address.is_global


def redact(text: str, placeholder: str, public_only: bool = False) -> tuple[str, int, int]:
  """(text with addresses replaced by `placeholder`, addresses replaced, addresses kept)."""
  counts = [0, 0]

  def replace(match: re.Match) -> str:
    found = match.group(0)
    address = parse(found, match.group('v6') is not None)
    if address is None:
      return found
    if keeps(address, public_only):
      counts[1] += 1
      return found
    counts[0] += 1
    return placeholder

  return IP_PATTERN.sub(replace, text), counts[0], counts[1]
