"""``python -m longcat.train`` (and ``torchrun -m longcat.train``): the entry point, ``longcat.cli.main``.

Under ``longcat-torchrun`` the exit code is also recorded for the launcher (``longcat.torchrun``)."""

import sys

from longcat.cli import main
from longcat.torchrun import record_exit_code

code = main()
record_exit_code(code)
sys.exit(code)
