#!/usr/bin/env python
"""Run a multi-stage pipeline recipe (recipes/pipelines/<name>.yaml), printing each stage's
validation loss at the end.

Every stage's configuration is composed and validated before the first stage starts. A stage that
finds its own checkpoints resumes from them (train.resume=auto), so rerunning an interrupted
pipeline continues where it stopped.

Examples:
    python tools/run_pipeline.py                                   # pretrain -> midtrain -> long_context -> sft
    python tools/run_pipeline.py --pipeline pretrain_growth --out runs/pretrain_growth
    python tools/run_pipeline.py --stages sft                      # one stage (its predecessors' checkpoints exist)
    python tools/run_pipeline.py --dry-run train.steps=10          # validate and print the stage commands
"""

import argparse
import sys
from pathlib import Path

from longcat.stages import available_pipelines, load_pipeline, run_pipeline, validate_pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="pipeline", choices=available_pipelines(),
                        help="which pipeline recipe (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="root folder of the stages' runs (default runs/<pipeline>)")
    parser.add_argument("--stages", default="", help="comma-separated subset of stages to run")
    parser.add_argument("--dry-run", action="store_true", help="validate every stage and print the stages; train nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage")
    args = parser.parse_args()
    out = args.out or Path("runs") / args.pipeline
    try:
        if args.dry_run:
            validate_pipeline(args.pipeline, args.overrides)
            for stage in load_pipeline(args.pipeline):
                how = (f"grows the previous checkpoint x{stage.grow_factor}" if stage.grow_factor > 1
                       else "weights from the previous stage" if stage.init_from_previous else "from scratch")
                print(f"{stage.name:14s} recipe={stage.recipe} {' '.join(stage.overrides)}  ({how}) -> {out / stage.name}")
            print(f"{args.pipeline}: every stage's configuration is valid")
            return 0
        results = run_pipeline(args.pipeline, out_root=out, overrides=args.overrides,
                               stages=[s for s in args.stages.split(",") if s] or None)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n== {args.pipeline}: validation loss per stage (first evaluation -> final)")
    for r in results:
        first = f"{r.initial_val_loss:.4f}" if r.initial_val_loss is not None else "-"
        last = f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "-"
        print(f"{r.name:14s} val loss {first} -> {last}   {r.wall_s:6.1f} s   {r.final_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
