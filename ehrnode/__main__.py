"""``python -m ehrnode`` is the ``ehrnode`` command."""

import sys

from ehrnode.cli import main

sys.exit(main())
