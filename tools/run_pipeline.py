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
    python tools/run_pipeline.py --dry-run train.steps=10 optim.warmup_steps=2   # validate, print the stage commands

Overrides apply to every stage. Keys a stage sets itself (e.g. pretrain_growth's model.num_layers
and its half-depth train.steps), train.out_dir (use --out) and train.init_from (set by the pipeline)
are refused rather than silently ignored.
"""

import argparse
import sys
from pathlib import Path

from longcat.stages import available_pipelines, plan_pipeline, run_pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="pipeline",
                        help=f"a pipeline recipe: one of {available_pipelines()} (recipes/pipelines/) or a path "
                        f"to such a .yaml file (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="root folder of the stages' runs (default runs/<pipeline>)")
    parser.add_argument("--stages", default="", help="comma-separated subset of stages to run")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every stage and print the stages; train nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage")
    args = parser.parse_args()
    out = args.out or Path("runs") / Path(args.pipeline).stem
    try:
        stages = [s for s in args.stages.split(",") if s] or None
        if args.dry_run:
            for stage, stage_args, _, previous_dir, _ in plan_pipeline(args.pipeline, out_root=out,
                                                                       overrides=args.overrides, stages=stages):
                if stage.grow_factor > 1:
                    start = (f"  (after: tools/grow_model.py --factor {stage.grow_factor} "
                             f"of the final checkpoint in {previous_dir})")
                elif stage.init_from_previous and previous_dir is not None:
                    start = f"  train.init_from=<the final checkpoint in {previous_dir}>"
                else:
                    start = "  (from scratch)"
                print(f"{stage.name}: longcat-train {' '.join(stage_args)}{start}")
            print(f"{args.pipeline}: every stage's configuration is valid")
            return 0
        results = run_pipeline(args.pipeline, out_root=out, overrides=args.overrides, stages=stages)
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
