"""Run the benchmark suite and regenerate docs/benchmarks.md (``make bench``).

    python tools/bench.py                          # full suite (a quiet machine: several minutes)
    python tools/bench.py --quick                  # tiny settings: a smoke test of every benchmark
    python tools/bench.py --only throughput,memory --output benchmarks/results
    python tools/bench.py --report-only            # only regenerate docs/benchmarks.md from the JSON files
    python tools/bench.py --list

Each benchmark writes ``<output>/<name>.json``; the markdown report covers every JSON file in
``<output>`` (also those written by other benchmarks). What each one measures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from longcat.bench.report import write_report
from longcat.bench.suite import BENCHMARKS, run_suite, select

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="LongCat training benchmarks: throughput vs transformers, utilisation, memory, scaling, "
                    "checkpoint save. Writes <output>/<name>.json and regenerates the markdown report.",
        epilog="benchmarks: " + "; ".join(f"{b.name}: {b.summary}" for b in BENCHMARKS.values()))
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test, noisy numbers)")
    parser.add_argument("--only", metavar="NAME[,NAME]", default="",
                        help=f"run only these benchmarks (of {', '.join(BENCHMARKS)})")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for the JSON results (default: benchmarks/results)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="markdown report regenerated from every JSON in --output (default: docs/benchmarks.md)")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate the markdown report")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the report from --output")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if args.list:
        for bench in BENCHMARKS.values():
            print(f"{bench.name:12s} {bench.summary}")
        return 0
    docs = None if args.no_docs else args.docs
    if args.report_only:
        print(f"wrote {write_report(args.output, args.docs)}")
        return 0
    try:
        benchmarks = select(args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    def show(result, path):
        print(f"\n== {result.name}: {path} ({result.wall_s:.0f} s)")
        for key, value in result.metrics.items():
            print(f"  {key:45s} {value:.4g}" if isinstance(value, float) else f"  {key:45s} {value}")

    try:
        run_suite(benchmarks, quick=args.quick, output_dir=args.output, docs_path=docs, on_result=show,
                  threads=args.threads)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if docs is not None and docs.exists():
            print(f"\nreport: {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
