"""``python -m lightning_green compare|show`` (see :mod:`lightning_green.cli`). Reads summaries
only: torch and Lightning are not imported."""

import sys

from lightning_green.cli import main

if __name__ == "__main__":
    sys.exit(main())
