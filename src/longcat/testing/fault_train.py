"""``python -m longcat.testing.fault_train [--fault-* OPTIONS] [longcat-train arguments]``: the training CLI
with the reliability tests' faults installed.

The ``--fault-*`` options (``FaultPlan``, see ``longcat.testing.faults``) become a ``FaultInjection``
callback of the run; every other argument goes to ``longcat.cli.main`` unchanged, so without fault
options this is exactly ``longcat-train``. ``testing/jobs.py`` launches runs through here (torchrun's
``-m`` and the forked workers). The one module of ``longcat.testing`` that imports the CLI::

    torchrun --nproc-per-node 2 -m longcat.testing.fault_train --fault-kill-at-step 5:1 \\
        --fault-once-marker /tmp/killed-once parallel.ep=2 train.steps=10
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from longcat.cli import main as cli_main
from longcat.testing.faults import FaultInjection, FaultPlan


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the training CLI on ``argv`` (default ``sys.argv[1:]``) with its fault options installed."""
    try:
        plan, rest = FaultPlan.parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return cli_main(rest, callbacks=[FaultInjection(plan)] if plan else ())


if __name__ == "__main__":
    sys.exit(main())
