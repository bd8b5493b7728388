"""`python -m fmjax.plan` and `fmjax-plan`: see fmjax/perf/plan.py."""

import sys

from fmjax.perf.plan import main

if __name__ == '__main__':
  sys.exit(main())
