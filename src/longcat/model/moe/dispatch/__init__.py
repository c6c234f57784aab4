"""Token dispatchers, one interface (``TokenDispatcher``, ``base``), one module each:

    local          LocalTokenDispatcher            one process, every FFN expert local
    all_to_all     AllToAllTokenDispatcher         expert parallelism: uneven all-to-alls over ep
    chunked        ChunkedAllToAllTokenDispatcher  the all-to-all in pipelined chunks by local expert
    token_chunked  TokenChunkedTokenDispatcher     the all-to-all in pipelined chunks by token
    all_gather     AllGatherTokenDispatcher        expert parallelism: all-gather, reduce-scatter over ep

``permute`` holds the permutations they share (token copies into send order and back, rows into
local-expert order). A new dispatcher is a new module here subclassing ``TokenDispatcher``; the
parallel plan (``longcat.model.parallel.expert_parallel``) chooses which one each MoE gets.
"""

from longcat.model.moe.dispatch.all_gather import AllGatherTokenDispatcher
from longcat.model.moe.dispatch.all_to_all import AllToAllTokenDispatcher
from longcat.model.moe.dispatch.base import (
    DispatchCounters,
    DispatchedTokens,
    PendingCombine,
    TokenDispatcher,
)
from longcat.model.moe.dispatch.chunked import ChunkedAllToAllTokenDispatcher
from longcat.model.moe.dispatch.local import LocalTokenDispatcher
from longcat.model.moe.dispatch.permute import (
    DispatchHandle,
    SourcePermutation,
    count_by_expert,
    local_expert_order,
    permute_rows,
    permute_tokens,
    source_permutation,
    unpermute_tokens,
    weight_and_unpermute,
)
from longcat.model.moe.dispatch.token_chunked import TokenChunkedTokenDispatcher

__all__ = [
    "AllGatherTokenDispatcher",
    "AllToAllTokenDispatcher",
    "ChunkedAllToAllTokenDispatcher",
    "DispatchCounters",
    "DispatchHandle",
    "DispatchedTokens",
    "LocalTokenDispatcher",
    "PendingCombine",
    "SourcePermutation",
    "TokenChunkedTokenDispatcher",
    "TokenDispatcher",
    "count_by_expert",
    "local_expert_order",
    "permute_rows",
    "permute_tokens",
    "source_permutation",
    "unpermute_tokens",
    "weight_and_unpermute",
]
