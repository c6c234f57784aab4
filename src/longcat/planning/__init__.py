"""Planning a production run: the real sharded model of one rank, built on the meta device under a
fake process group, with its memory, communication, FLOPs and modelled step time.

    shard      fake process groups, the real ``parallelize`` on meta, what a rank holds
    memory     weights / grads / optimizer bytes (exact) and activations (modelled)
    comm       bytes per step per group (EP, TP, CP, DP/EDP, PP)
    timing     device specs (``devices.yaml``), modelled step time, tokens/s, MFU
    dry_run    ``dry_run`` for one rank, ``sweep`` over candidate layouts
    report     text tables
"""

from longcat.planning.dry_run import DryRunReport, LayoutError, ModelTotals, SweepRow, dry_run, sweep
from longcat.planning.shard import RankShard, build_rank_shard, fake_process_groups
from longcat.planning.timing import DeviceSpec, load_device

__all__ = [
    "DeviceSpec",
    "DryRunReport",
    "LayoutError",
    "ModelTotals",
    "RankShard",
    "SweepRow",
    "build_rank_shard",
    "dry_run",
    "fake_process_groups",
    "load_device",
    "sweep",
]
