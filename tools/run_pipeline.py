#!/usr/bin/env python
"""Run a multi-stage recipe chain (pre-train -> mid-train -> long context -> SFT, or model growth)."""

import argparse
import sys
from pathlib import Path

from longcat.stages import PIPELINES, run_pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", default="pipeline", choices=sorted(PIPELINES), help="which chain (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="root folder of the stages' runs")
    parser.add_argument("--stages", default="", help="comma-separated subset of stages to run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage")
    args = parser.parse_args()
    try:
        results = run_pipeline(args.pipeline, out_root=args.out, overrides=args.overrides,
                               stages=[s for s in args.stages.split(",") if s] or None)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n== {args.pipeline}: final validation loss per stage")
    for r in results:
        first = f"{r.initial_val_loss:.4f}" if r.initial_val_loss is not None else "-"
        last = f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "-"
        print(f"{r.name:14s} val loss {first} -> {last}   {r.wall_s:6.1f} s   {r.final_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
