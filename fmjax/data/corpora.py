"""Corpora that ship with Python: the default training data needs no download.

The default corpus is every `.py` file of the running interpreter's standard library
(about 1800 files, 31 MB), tests and idlelib included: building it takes under a second,
so nothing is excluded. Third-party code under site-packages/dist-packages is not part of it.
"""

from __future__ import annotations

import os
import sysconfig

_EXCLUDED_DIRS = ('site-packages', 'dist-packages', '__pycache__')


def stdlib_dir() -> str:
  """The directory of the standard library's Python sources."""
  return sysconfig.get_paths()['stdlib']


def stdlib_files() -> list[str]:
  """Sorted absolute paths of the standard library's own `.py` files."""
  root = stdlib_dir()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith('.py'))
  return sorted(found)
