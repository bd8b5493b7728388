"""`python -m fmjax.bench` and `fmjax-bench`: see fmjax/perf/bench.py."""

import sys

from fmjax.perf.bench import main

if __name__ == '__main__':
  sys.exit(main())
