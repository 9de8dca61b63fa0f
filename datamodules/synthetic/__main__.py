"""``python -m datamodules.synthetic``: see :func:`datamodules.synthetic.cli.main`."""

import sys

from datamodules.synthetic.cli import main

if __name__ == "__main__":
    sys.exit(main())
