"""``python -m pyroflows``: the same command line as the ``pyroflows`` entry point."""

import sys

from pyroflows.density.cli import main

sys.exit(main())
