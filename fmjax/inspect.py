"""`python -m fmjax.inspect` and `fmjax-inspect`: see fmjax/inference/inspect.py."""

import sys

from fmjax.inference.inspect import main

if __name__ == '__main__':
  sys.exit(main())
