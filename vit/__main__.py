"""`python -m vit ...`: the `vit` command, for an environment whose scripts folder is not on PATH."""

import sys

from vit.cli import main

sys.exit(main())
