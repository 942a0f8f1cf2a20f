"""``python -m lightning_green compare RUN [RUN ...]`` and ``python -m lightning_green show RUN``
(see :mod:`lightning_green.compare`). Reads summaries only: torch and Lightning are not imported."""

import sys

from lightning_green.compare import main

if __name__ == "__main__":
    sys.exit(main())
