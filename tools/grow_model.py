#!/usr/bin/env python
"""Grow a checkpoint: stack its L layers r times into an r x L model (arXiv 2509.01322 §3.1.2)."""

import argparse
import sys
from pathlib import Path

from longcat.scaling.growth import grow_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a checkpoint folder, a run's checkpoints/ folder or a run's out_dir (latest is used)")
    parser.add_argument("--output", type=Path, required=True,
                        help="the new run's out_dir; the grown checkpoint goes to OUTPUT/checkpoints/")
    parser.add_argument("--factor", type=int, default=2, help="how many times to stack the layers (default 2)")
    parser.add_argument("--fresh-optimizer", action="store_true", help="do not carry AdamW moments over")
    args = parser.parse_args()
    try:
        path = grow_checkpoint(args.checkpoint, args.output / "checkpoints", factor=args.factor,
                               keep_optimizer=not args.fresh_optimizer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"grown checkpoint: {path}")
    print(f"continue with: longcat-train ... model.num_layers=<{args.factor} x L> train.out_dir={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
