"""``python -m dynattn``: the same command line as the ``dynattn`` console script."""

import sys

from dynattn.cli import main

if __name__ == "__main__":
    sys.exit(main())
