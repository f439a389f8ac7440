"""`python -m luq ...`: the same as the `luq` command."""

import sys

from luq.cli import main

sys.exit(main())
