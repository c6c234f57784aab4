#!/usr/bin/env python
"""LR sweep at a proxy width and at a wider target: does the width-transferred LR land within 2x?

Each width's LR sweep is a Hydra sweep; ``--print-multirun`` prints it as ``longcat-train -m`` commands
(one per width, every job in its own folder) instead of running it in this process.
"""

import argparse
import sys
from pathlib import Path

from longcat.scaling.transfer_sweep import multirun_commands, run_sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy-hidden", type=int, default=64, help="proxy hidden size (default %(default)s)")
    parser.add_argument("--factor", type=int, default=4, help="target width / proxy width (default %(default)s)")
    parser.add_argument("--lrs", default="0.001,0.003,0.01,0.03", help="comma-separated LRs to sweep")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer_sweep"), help="output folder")
    parser.add_argument("--print-multirun", action="store_true",
                        help="print the sweep as longcat-train -m commands (one per width) and exit")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.print_multirun:
        print("\n".join(multirun_commands(proxy_hidden=args.proxy_hidden, factor=args.factor,
                                          lrs=[float(x) for x in args.lrs.split(",")], steps=args.steps,
                                          out_dir=args.out, extra=args.overrides)))
        return 0
    report = run_sweep(proxy_hidden=args.proxy_hidden, factor=args.factor,
                       lrs=[float(x) for x in args.lrs.split(",")], steps=args.steps, out_dir=args.out,
                       extra=args.overrides)
    print(f"proxy best lr {report['proxy_best_lr']:g}; target best lr {report['target_best_lr']:g}; "
          f"transferred lr {report['transferred_lr']:g} ({report['transferred_over_best']:.2f}x the best): "
          f"{'within' if report['within_2x'] else 'NOT within'} 2x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
