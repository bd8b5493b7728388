"""Elapsed-time lines while something long runs (e.g. a compile), so a waiting user sees it is alive.

    with elapsed.report('compiling the train step for v5p-8'):
      compiled = lowered.compile()

prints `compiling the train step for v5p-8 ... 30 s`, `... 60 s`, ... every `every` seconds from a
background thread, then `compiling the train step for v5p-8: done in 75 s`; a block shorter than
`every` prints nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, TextIO


@contextlib.contextmanager
def report(what: str, every: float = 30.0, out: TextIO | None = None,
           clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
  """While the block runs: `{what} ... {seconds} s` every `every` seconds on `out` (default stderr),
  and `{what}: done in {seconds} s` when it ends well after such a line. Silent for short blocks."""
  stop = threading.Event()
  start = clock()
  printed = []

  def say(line: str) -> None:
    stream = sys.stderr if out is None else out
    print(line, file=stream, flush=True)

  def tick() -> None:
    while not stop.wait(every):
      printed.append(True)
      say(f'{what} ... {clock() - start:.0f} s')

  thread = threading.Thread(target=tick, name='fmjax-elapsed', daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
  if printed:   # not after an error: the error is the next line
    say(f'{what}: done in {clock() - start:.0f} s')
