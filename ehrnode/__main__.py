"""``python -m ehrnode`` is the ``ehrnode`` command."""

import sys

from ehrnode.launch import main

sys.exit(main())
