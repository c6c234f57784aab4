#!/usr/bin/env python
"""Dry-run a training configuration at production scale: build one rank's real shards, count and model.

    python tools/dry_run.py [recipe=NAME] KEY=VALUE ... --world-size N [--rank R] [--device NAME]
                            [--json PATH] [--memory-limit-gib G] [--assume-cp C] [--sweep]

The KEY=VALUE overrides (anywhere on the line, before or after the flags) are exactly a training
run's (``longcat-train``): the configuration is composed and validated by the same code. Rank R's
process groups come from PyTorch's fake backend (collectives move nothing), its model is built on the
meta device (nothing is allocated) and the real ``parallelize`` applies TP / EP / PP / FSDP to it. The
report gives that rank's parameters (dense / experts / embedding / head), bytes of weights, gradients
and optimizer state, the activation estimate for the micro-batches in flight under the pipeline
schedule, peak memory, communication bytes per step per group, model FLOPs per step and, for
``--device``, the modelled step time, tokens/s per device and MFU; and the whole model's total and
activated parameters.

Example (the paper's layout: EP groups of 32 folding CP 8, ZB-V pipeline, DP for the rest; see
docs/planning.md):
    python tools/dry_run.py model=longcat_flash moe.expected_ffn_experts=8 parallel.ep=32 parallel.cp=8 \\
        parallel.pp=14 parallel.pp_schedule=zbv data.seq_length=8192 data.micro_batch_size=1 \\
        data.global_batch_size=1024 train.bf16=true train.activation_checkpointing=true \\
        --world-size 1792 --rank 0 --device H800 --memory-limit-gib 60

Exit status: 0 the layout fits; 2 invalid configuration or layout (each problem named); 3 it does not
fit the device's HBM or --memory-limit-gib (the numbers printed). With --sweep: 0 when some candidate fits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longcat.tool_args import positive_float, positive_int


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe=NAME and KEY=VALUE overrides, as for longcat-train")
    parser.add_argument("--world-size", type=positive_int, required=True, help="ranks of the job")
    parser.add_argument("--rank", type=int, default=0, help="the rank to build (default 0: first pipeline stage)")
    parser.add_argument("--device", default=None,
                        help="device preset for timing and the HBM check: H800, H100, H200 (or a name in "
                             "--device-spec); default: none (no timing)")
    parser.add_argument("--device-spec", type=Path, default=None,
                        help="YAML of device presets (keys as in src/longcat/planning/devices.yaml)")
    parser.add_argument("--peak-tflops", type=positive_float, help="override the device's dense bf16 peak")
    parser.add_argument("--hbm-gib", type=positive_float, help="override the device's memory, GiB")
    parser.add_argument("--intra-node-gbs", type=positive_float, help="override the intra-node bandwidth, GB/s")
    parser.add_argument("--inter-node-gbs", type=positive_float, help="override the inter-node bandwidth, GB/s")
    parser.add_argument("--memory-limit-gib", type=positive_float,
                        help="also check the peak against this budget (e.g. 60, the paper's peak)")
    parser.add_argument("--assume-cp", type=positive_int, default=None,
                        help="plan with this context-parallel degree while the configuration has no parallel.cp: "
                             "the dp ranks fold cp (dp = replicas x cp); activations and KV exchange per cp rank")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this path")
    parser.add_argument("--sweep", action="store_true",
                        help="dry-run candidate layouts of --world-size (needs --device) and rank them")
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the flags
    if args.rank < 0 or args.rank >= args.world_size:
        parser.error(f"--rank {args.rank} must lie in [0, --world-size {args.world_size})")
    if args.sweep and args.device is None:
        parser.error("--sweep ranks layouts by modelled step time: give --device (e.g. --device H800)")
    device_flags = {"--device-spec": args.device_spec, "--peak-tflops": args.peak_tflops, "--hbm-gib": args.hbm_gib,
                    "--intra-node-gbs": args.intra_node_gbs, "--inter-node-gbs": args.inter_node_gbs}
    orphans = [flag for flag, value in device_flags.items() if value is not None]
    if orphans and args.device is None:
        verb = "describes" if len(orphans) == 1 else "describe"
        parser.error(f"{', '.join(orphans)} {verb} the device, but no --device is given, so it would be "
                     "ignored: add --device (e.g. --device H800)")
    recipe = "pretrain"
    overrides = []
    for item in args.overrides:
        if item.startswith("recipe="):
            recipe = item.split("=", 1)[1]
        else:
            overrides.append(item)
    args.recipe = recipe
    if args.json is not None:
        problem = json_path_problem(args.json)
        if problem:
            parser.exit(2, f"error: --json {args.json}: {problem}\n")
    return args, overrides


def json_path_problem(path: Path) -> str:
    """Why ``path`` cannot take the JSON report, or ``""``: checked before the (long) dry run."""
    import os

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return "is a folder; give a file path, e.g. --json " + str(path / "plan.json")
    if not parent.is_dir():
        return f"the folder {parent} does not exist; create it or choose another path"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"cannot write to {path if path.exists() else parent} (permissions)"
    return ""


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from longcat.config.compose import compose_run_config
    from longcat.planning import LayoutError, dry_run, load_device, sweep
    from longcat.planning.report import format_report, format_sweep

    try:
        run_cfg, _ = compose_run_config(args.recipe, overrides)
        device = None
        if args.device is not None:
            device = load_device(args.device, spec_file=args.device_spec, peak_tflops=args.peak_tflops,
                                 hbm_gib=args.hbm_gib, intra_node_gbs=args.intra_node_gbs,
                                 inter_node_gbs=args.inter_node_gbs)
        if args.sweep:
            assert device is not None  # parse_args requires it
            rows = sweep(run_cfg, world_size=args.world_size, device=device, memory_limit_gib=args.memory_limit_gib,
                         assume_cp=args.assume_cp)
            print(format_sweep(rows, cp=args.assume_cp or run_cfg.parallel.cp))
            if all(r.report is None for r in rows):  # bad input, not a layout that misses the memory
                print(f"error: no candidate layouts for world size {args.world_size}: none of the {len(rows)} "
                      "tried is valid (the table gives each one's reason)", file=sys.stderr)
                return 2
            if args.json:
                args.json.write_text(json.dumps([{"overrides": r.overrides, "error": r.error,
                                                  "report": r.report.to_dict() if r.report else None}
                                                 for r in rows], indent=2))
            return 0 if any(r.report is not None and r.report.fits for r in rows) else 3
        report = dry_run(run_cfg, world_size=args.world_size, rank=args.rank, device=device,
                         memory_limit_gib=args.memory_limit_gib, assume_cp=args.assume_cp)
    except LayoutError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ValueError as exc:
        for line in getattr(exc, "errors", None) or [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.fits else 3


if __name__ == "__main__":
    sys.exit(main())
