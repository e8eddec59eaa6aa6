"""``python -m kameo ...``: the ``kameo`` command line (:mod:`kameo.cli`)."""

import sys

from kameo.cli import main

if __name__ == "__main__":
    sys.exit(main())
