"""`python -m fmjax.curate`: see fmjax/curate/cli.py."""

import sys

from fmjax.curate.cli import main

sys.exit(main())
