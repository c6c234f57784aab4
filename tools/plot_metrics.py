#!/usr/bin/env python
"""Draw a run's loss curves, FFN experts per token per layer, expert-load heatmap and stability suite
(R_g, router cosine similarity, LB / z losses, last-hidden norm) from its JSONL; print the per-layer
FFN-experts-per-token figures over the last 20% of steps.

A torn last line (a crash mid-write) is skipped with a warning; any other bad line is an error.
Exit status 2 with ``error: ...`` for a missing or bad metrics file or an output that cannot be written."""

import argparse
import logging
import sys
from pathlib import Path

from longcat.plots import plot_all, read_metrics
from longcat.tool_args import positive_float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, default=Path("runs/pretrain/metrics.jsonl"),
                        help="metrics.jsonl written by longcat-train (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="folder for the PNGs (default: beside the metrics)")
    parser.add_argument("--target-ffn-experts", type=positive_float, default=None,
                        help="draw the target K_e line (moe.expected_ffn_experts)")
    args = parser.parse_args()
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    if args.metrics.is_dir():
        print(f"error: {args.metrics} is a directory; pass the metrics file, e.g. --metrics "
              f"{args.metrics / 'metrics.jsonl'}", file=sys.stderr)
        return 2
    if not args.metrics.is_file():
        print(f"error: {args.metrics} does not exist; train first (make train)", file=sys.stderr)
        return 2
    try:
        records = read_metrics(args.metrics)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = args.output or args.metrics.parent / "plots"
    try:
        paths = plot_all(args.metrics, out_dir, target_ffn_experts=args.target_ffn_experts, records=records)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the plots to {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    _print_budget_summary(args.metrics, records, args.target_ffn_experts)
    return 0


def _print_budget_summary(metrics: Path, records: list[dict], target) -> None:
    """The dynamic-computation figures of the run (per layer, last 20% of steps)."""
    import json

    from longcat.plots import budget_summary, format_budget_summary

    config = metrics.parent / "config.json"
    if target is None and config.is_file():
        target = json.loads(config.read_text()).get("moe", {}).get("expected_ffn_experts")
    if target is not None:
        rows = budget_summary(records, target=float(target))
        if rows:
            print(format_budget_summary(rows, target=float(target)))


if __name__ == "__main__":
    sys.exit(main())
