"""elapsed.report: lines while a long block runs, nothing for a short one."""

import io
import re
import threading

import pytest

from fmjax.runtime import elapsed


def test_a_long_block_prints_elapsed_lines_then_done():
  out, release = io.StringIO(), threading.Event()
  with elapsed.report('compiling the train step for v5p-8', every=0.02, out=out):
    release.wait(0.5)   # the block runs ~25 intervals
  lines = out.getvalue().splitlines()
  assert len(lines) >= 3, lines
  assert all(re.fullmatch(r'compiling the train step for v5p-8 \.\.\. \d+ s', line) for line in lines[:-1]), lines
  assert re.fullmatch(r'compiling the train step for v5p-8: done in \d+ s', lines[-1]), lines
  assert not any(t.name == 'fmjax-elapsed' for t in threading.enumerate())   # the thread is gone


def test_the_seconds_are_the_clocks():
  out, ticks = io.StringIO(), iter(range(0, 1000, 30))
  with elapsed.report('x', every=0.02, out=out, clock=lambda: next(ticks)):
    threading.Event().wait(0.2)
  seconds = [int(m) for m in re.findall(r'\.\.\. (\d+) s', out.getvalue())]
  assert seconds and seconds == list(range(30, 30 * (len(seconds) + 1), 30))


def test_a_short_block_is_silent():
  out = io.StringIO()
  with elapsed.report('compiling', every=30, out=out):
    pass
  assert out.getvalue() == ''


def test_an_error_ends_the_lines_without_done():
  out = io.StringIO()
  with pytest.raises(ValueError):
    with elapsed.report('compiling', every=0.02, out=out):
      threading.Event().wait(0.2)
      raise ValueError('no')
  assert out.getvalue() and 'done' not in out.getvalue()
  assert not any(t.name == 'fmjax-elapsed' for t in threading.enumerate())
