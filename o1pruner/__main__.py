"""``python -m o1pruner COMMAND ...`` is the ``o1pruner`` command."""

import sys

from o1pruner.cli import main

sys.exit(main())
