"""``python -m edgemind``: the same as the ``edgemind`` command."""

import sys

from edgemind.cli import main

if __name__ == "__main__":
    sys.exit(main())
