"""`python -m fmjax.classify` and `fmjax-classify`: see fmjax/inference/classify.py."""

import sys

from fmjax.inference.classify import main

if __name__ == '__main__':
  sys.exit(main())
