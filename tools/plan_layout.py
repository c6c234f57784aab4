#!/usr/bin/env python
"""Print a parallel layout and where given ranks sit in it, without launching anything.

Example:
    python tools/plan_layout.py --world-size 1024 --tp 4 --pp 8 --ep 32 --rank 37
    python tools/plan_layout.py --world-size 2048 --pp 16 --cp 8 --ep 32   # LongCat-Flash: EP=32 folds CP=8 x DP=4
    python tools/plan_layout.py --world-size 8 --tp 2 --ep 4 --all
    python tools/plan_layout.py --world-size 64 --tp 4 --pp 2 --ep 8 --heads 64 --experts 512 --layers 28

Exit status: 0 on success, 2 if the layout (or the model check) is invalid.
"""

from __future__ import annotations

import argparse
import sys

from longcat.distributed import ParallelDims, RankLayout, rank_layout

GROUP_NAMES = ("tp", "cp", "dp", "pp", "ep", "edp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, required=True, help="total number of ranks")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel degree (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel degree (default 1)")
    parser.add_argument("--dp", type=int, default=-1, help="data parallel degree; -1 infers it (default)")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel degree (default 1)")
    parser.add_argument("--cp", type=int, default=1, help="context parallel degree (default 1)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, action="append", help="rank to show (repeatable); default: examples")
    which.add_argument("--all", action="store_true", help="show every rank")
    parser.add_argument("--heads", type=int, help="num_attention_heads to check against tp")
    parser.add_argument("--experts", type=int, help="n_routed_experts to check against ep")
    parser.add_argument("--layers", type=int, help="num_layers to check against the pipeline stages")
    parser.add_argument("--stages", type=int, help="pipeline stages in total (default: pp)")
    return parser.parse_args(argv)


def example_ranks(dims: ParallelDims) -> list[int]:
    """First rank, its tp neighbour, the next dp replica, the next stage and the last rank."""
    candidates = [0, 1, dims.tp, dims.tp * dims.cp, dims.ep, dims.stage_size, dims.world_size - 1]
    return sorted({r for r in candidates if r < dims.world_size})


def format_rank(layout: RankLayout) -> str:
    coords = (
        f"rank {layout.rank}: pp={layout.pp_rank} dp={layout.dp_rank} cp={layout.cp_rank} tp={layout.tp_rank} "
        f"| edp={layout.edp_rank} ep={layout.ep_rank}"
    )
    members = [f"  {name:>3} group: {_compact(getattr(layout, f'{name}_ranks'))}" for name in GROUP_NAMES]
    return "\n".join([coords, *members])


def _compact(ranks: tuple[int, ...]) -> str:
    """``[0..7]`` for a contiguous run, ``[1, 5, ..., 125] (stride 4, 32 ranks)`` for a long stride."""
    if len(ranks) > 1 and all(b - a == 1 for a, b in zip(ranks, ranks[1:])):
        return f"[{ranks[0]}..{ranks[-1]}] ({len(ranks)} ranks)"
    if len(ranks) > 6:
        stride = ranks[1] - ranks[0]
        if all(b - a == stride for a, b in zip(ranks, ranks[1:])):
            return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] (stride {stride}, {len(ranks)} ranks)"
    return str(list(ranks))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dims = ParallelDims(args.world_size, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, cp=args.cp)
        if args.heads is not None or args.experts is not None or args.layers is not None:
            missing = [f"--{n}" for n in ("heads", "experts", "layers") if getattr(args, n) is None]
            if missing:
                raise ValueError(f"the model check needs --heads, --experts and --layers together; missing {missing}")
            dims.check_model(
                num_attention_heads=args.heads,
                n_routed_experts=args.experts,
                num_layers=args.layers,
                num_stages=args.stages,
            )
        ranks = list(range(dims.world_size)) if args.all else (args.rank or example_ranks(dims))
        layouts = [rank_layout(dims, r) for r in ranks]
    except ValueError as err:
        print(f"invalid layout: {err}", file=sys.stderr)
        return 2
    print(dims)
    print(f"dense mesh (pp, dp, cp, tp) = {dims.dense_mesh_shape}; expert mesh (pp, edp, ep) = "
          f"{dims.expert_mesh_shape}")
    if args.heads is not None:
        print(
            f"model ok: {args.heads} heads / tp={dims.tp}, {args.experts} experts / ep={dims.ep}, "
            f"{args.layers} layers / {args.stages or dims.pp} stages"
        )
    for layout in layouts:
        print(format_rank(layout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
