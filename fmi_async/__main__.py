"""``python -m fmi_async``: the ``fmi`` command (see :mod:`fmi_async.tools.cli`)."""

import sys

from .tools.cli import main

sys.exit(main())
