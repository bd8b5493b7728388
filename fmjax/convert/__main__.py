"""`python -m fmjax.convert`: see fmjax/convert/cli.py."""

import sys

from fmjax.convert.cli import main

sys.exit(main())
