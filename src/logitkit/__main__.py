"""``python -m logitkit``: the same command as the ``logitkit`` console script."""

import sys

from logitkit.cli import main

sys.exit(main())
