"""``python -m medmark ...`` = the ``medmark`` command."""

import sys

from medmark.cli import main

sys.exit(main())
