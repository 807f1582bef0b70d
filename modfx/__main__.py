"""`python -m modfx ...`: the same as the `modfx` command."""

import sys

from .cli import main

sys.exit(main())
