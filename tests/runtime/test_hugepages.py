"""Huge pages for malloc: the CLI re-executes itself once with the glibc tunable set."""

import os
import subprocess
import sys

import pytest

from fmjax.runtime import hugepages

_PROBE = ('from fmjax.runtime import hugepages; hugepages.reexec_with_hugepages(); import os; '
          'print(os.environ.get("GLIBC_TUNABLES", "")); print(hugepages.original_environment().get("GLIBC_TUNABLES", "-"))')


def _probe(**env):
  full = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hugepages.ORIGINAL, 'FMJAX_HUGEPAGES')}
  full.update(env)
  out = subprocess.run([sys.executable, '-c', _PROBE], env=full, capture_output=True, text=True, check=True)
  return out.stdout.split()


def test_tunables_keep_what_the_user_set():
  assert hugepages.tunables_with_hugepages('') == 'glibc.malloc.hugetlb=1'
  assert hugepages.tunables_with_hugepages('glibc.malloc.arena_max=2') == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.skipif(not hugepages._supported(), reason='needs Linux, glibc >= 2.35 and THP enabled')
def test_reexec_sets_the_tunable_once_and_children_can_get_the_original_back():
  assert _probe() == ['glibc.malloc.hugetlb=1', '-']
  assert _probe(GLIBC_TUNABLES='glibc.malloc.arena_max=2') == [
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'glibc.malloc.arena_max=2']
  assert _probe(FMJAX_HUGEPAGES='0') == ['-']  # opted out: nothing set
