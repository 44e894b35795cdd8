"""``python -m core.control_ops``: see :mod:`core.control_ops.cli`."""

import sys

from core.control_ops.cli import main

sys.exit(main())
