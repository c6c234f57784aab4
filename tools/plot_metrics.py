#!/usr/bin/env python
"""Draw a run's loss curves, FFN experts per token per layer, expert-load heatmap and stability suite
(R_g, router cosine similarity, LB / z losses, last-hidden norm) from its JSONL; print the per-layer
FFN-experts-per-token figures over the last 20% of steps."""

import argparse
import sys
from pathlib import Path

from longcat.plots import plot_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, default=Path("runs/pretrain/metrics.jsonl"),
                        help="metrics.jsonl written by longcat-train (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="folder for the PNGs (default: beside the metrics)")
    parser.add_argument("--target-ffn-experts", type=float, default=None,
                        help="draw the target K_e line (moe.expected_ffn_experts)")
    args = parser.parse_args()
    if not args.metrics.is_file():
        print(f"error: {args.metrics} does not exist; train first (make train)", file=sys.stderr)
        return 2
    try:
        paths = plot_all(args.metrics, args.output or args.metrics.parent / "plots",
                         target_ffn_experts=args.target_ffn_experts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    _print_budget_summary(args.metrics, args.target_ffn_experts)
    return 0


def _print_budget_summary(metrics: Path, target) -> None:
    """The dynamic-computation figures of the run (per layer, last 20% of steps)."""
    import json

    from longcat.plots import read_metrics
    from longcat.plots_stability import budget_summary, format_budget_summary

    config = metrics.parent / "config.json"
    if target is None and config.is_file():
        target = json.loads(config.read_text()).get("moe", {}).get("expected_ffn_experts")
    if target is not None:
        rows = budget_summary(read_metrics(metrics), target=float(target))
        if rows:
            print(format_budget_summary(rows, target=float(target)))


if __name__ == "__main__":
    sys.exit(main())
