#!/usr/bin/env python
"""Draw a run's loss curves, FFN experts per token per layer and expert-load heatmap from its JSONL."""

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
