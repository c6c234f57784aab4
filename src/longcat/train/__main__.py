"""``python -m longcat.train`` (and ``torchrun -m longcat.train``): the entry point, ``longcat.cli.main``."""

import sys

from longcat.cli import main

sys.exit(main())
