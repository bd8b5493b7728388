"""`python -m fmjax.generate` and `fmjax-generate`: see fmjax/inference/generate.py."""

import sys

from fmjax.inference.generate import main

if __name__ == '__main__':
  sys.exit(main())
