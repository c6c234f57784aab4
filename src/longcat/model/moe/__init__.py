"""Mixture of experts: router -> token dispatcher -> grouped-GEMM experts -> combine."""

from longcat.model.moe.dispatch import (
    AllToAllTokenDispatcher,
    ChunkedAllToAllTokenDispatcher,
    DispatchedTokens,
    DispatchHandle,
    LocalTokenDispatcher,
    PendingCombine,
    TokenDispatcher,
)
from longcat.model.moe.experts import GroupedExperts, grouped_linear
from longcat.model.moe.layer import MoE, MoEInFlight, MoEStats, router_stats
from longcat.model.moe.router import RouterOutput, TopKRouter

__all__ = [
    "AllToAllTokenDispatcher",
    "ChunkedAllToAllTokenDispatcher",
    "DispatchHandle",
    "DispatchedTokens",
    "GroupedExperts",
    "LocalTokenDispatcher",
    "MoE",
    "MoEInFlight",
    "MoEStats",
    "PendingCombine",
    "RouterOutput",
    "TokenDispatcher",
    "TopKRouter",
    "grouped_linear",
    "router_stats",
]
