"""`python -m fmjax.evaluate` and `fmjax-evaluate`: see fmjax/inference/evaluate.py."""

import sys

from fmjax.inference.evaluate import main

if __name__ == '__main__':
  sys.exit(main())
