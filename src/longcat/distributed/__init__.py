"""Model-agnostic distributed pieces: degrees, process groups and autograd-aware collectives.

Nothing here holds process-group state: ``ParallelDims`` is plain data, ``ProcessGroups`` is built
once by the entry point and passed down, and every collective takes its group explicitly.
"""

from longcat.distributed.collectives import (
    AllToAllHandle,
    ExchangedCounts,
    all_gather_along,
    all_reduce_sum,
    all_to_all_uneven,
    copy_to_group,
    exchange_counts,
    gather_from_group,
    reduce_scatter_along,
    split_to_group,
)
from longcat.distributed.groups import ProcessGroups, RankLayout, rank_layout
from longcat.distributed.parallel_dims import ParallelDims

__all__ = [
    "AllToAllHandle",
    "ExchangedCounts",
    "ParallelDims",
    "ProcessGroups",
    "RankLayout",
    "all_gather_along",
    "all_reduce_sum",
    "all_to_all_uneven",
    "copy_to_group",
    "exchange_counts",
    "gather_from_group",
    "rank_layout",
    "reduce_scatter_along",
    "split_to_group",
]
