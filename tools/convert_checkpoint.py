"""Convert fmjax checkpoints (to/from Hugging Face, params-only): see `--help`."""

import sys

from fmjax.convert.cli import main

if __name__ == '__main__':
  sys.exit(main())
