"""Transparent huge pages for XLA's large host buffers (Linux, glibc >= 2.35).

XLA's CPU runtime allocates its temporaries afresh on every execution; buffers that big come
from `mmap`, so each step faults every 4 KiB page in again. On the 2-core CI machine that cost
more than the arithmetic: writing a fresh 100 MB array took 28 ms, 5.6 ms with huge pages, and
the nanoGPT-shape train step went from 31 to 22 ms. glibc turns huge pages on for its mmap'd
chunks with the tunable `glibc.malloc.hugetlb=1`, which it reads only at process start, so the
command-line entry points re-execute themselves once with it set. `FMJAX_HUGEPAGES=0` opts out.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
ORIGINAL = 'FMJAX_ORIGINAL_GLIBC_TUNABLES'  # what the user had, for child processes (baselines)
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _supported() -> bool:
  if sys.platform != 'linux':
    return False
  libc, version = platform.libc_ver()
  if libc != 'glibc' or tuple(int(p) for p in version.split('.')[:2] if p.isdigit()) < (2, 35):
    return False
  try:
    with open(_THP_MODE) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def tunables_with_hugepages(current: str) -> str:
  """GLIBC_TUNABLES with the huge-page tunable added (colon-separated, existing ones kept)."""
  return ':'.join(p for p in (current, TUNABLE) if p)


def reexec_with_hugepages() -> None:
  """Re-execute this command once with huge pages for malloc, if useful and not yet done.

  Call it first thing in a CLI `main` (before any work: the process image is replaced and the
  PID, arguments, stdio and signals carry over). A no-op when already set, opted out, or
  unsupported (not Linux/glibc >= 2.35, or THP disabled by the kernel).
  """
  current = os.environ.get('GLIBC_TUNABLES', '')
  if os.environ.get('FMJAX_HUGEPAGES', '1') == '0' or 'glibc.malloc.hugetlb' in current or not _supported():
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables_with_hugepages(current), **{ORIGINAL: current})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def original_environment() -> dict:
  """os.environ as the user started the command (without the tunable added here)."""
  env = dict(os.environ)
  if ORIGINAL in env:
    original = env.pop(ORIGINAL)
    if original:
      env['GLIBC_TUNABLES'] = original
    else:
      env.pop('GLIBC_TUNABLES', None)
  return env
