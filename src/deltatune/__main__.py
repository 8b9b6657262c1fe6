"""``python -m deltatune``: the command line (see :mod:`deltatune.cli`)."""

import sys

from deltatune.cli import main

if __name__ == "__main__":
    sys.exit(main())
