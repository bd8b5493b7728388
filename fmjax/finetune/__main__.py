"""`python -m fmjax.finetune`: see fmjax/finetune/run.py."""

import sys

from fmjax.finetune.run import main

sys.exit(main())
