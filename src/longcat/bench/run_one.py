"""``python -m longcat.bench.run_one NAME``: one benchmark of the suite in this process, its JSON written to
``--output`` (what ``longcat.bench.suite.run_suite`` starts for every benchmark, so that none inherits
another's process-wide settings). A separate module from ``suite`` so that ``-m`` does not run a module
the package has already imported.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from longcat.bench.suite import BENCHMARKS, Benchmark, run_one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longcat.bench.run_one",
                                     description="Run one benchmark of the suite in this process and write its JSON "
                                                 "(tools/bench.py runs each benchmark this way).")
    parser.add_argument("name", help=f"the benchmark: one of {', '.join(BENCHMARKS)}, or any name with --module")
    parser.add_argument("--module", help="module with run(*, quick) -> BenchResult (default: the suite's for NAME)")
    parser.add_argument("--summary", default="", help="one line on what it measures (with --module)")
    parser.add_argument("--output", type=Path, required=True, help="folder for <name>.json")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.module is None and args.name not in BENCHMARKS:
        parser.error(f"unknown benchmark {args.name!r}: choose from {', '.join(BENCHMARKS)} (or pass --module)")
    bench = BENCHMARKS[args.name] if args.module is None else Benchmark(args.name, args.summary, args.module)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    run_one(bench, quick=args.quick, output_dir=args.output, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
