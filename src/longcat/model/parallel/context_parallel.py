"""Context parallelism plan for LongCat-Flash: every MLA block attends over the cp group.

The model-agnostic pieces (the load-balanced sequence split, the cp all-gather) are in
``longcat.distributed.context_parallel``; the CP attention itself is ``MultiHeadLatentAttention``'s
CP branch (``longcat.model.attention``).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from longcat.model.attention import ExpandedKV, MultiHeadLatentAttention
from longcat.model.model import LongcatFlashModel

__all__ = ["apply_context_parallel"]


def apply_context_parallel(model: nn.Module, *, cp_group: dist.ProcessGroup,
                           expanded_kv: ExpandedKV | str | None = None) -> nn.Module:
    """The CP plan for LongCat-Flash: every MLA block (decoder layers and the MTP head) attends over
    the cp group, and the backbone takes the local tokens. In place; returns ``model``.

    Sets ``MultiHeadLatentAttention.cp_group`` (and ``cp_expanded_kv``) on every MLA block and
    ``LongcatFlashModel.cp_group`` on the backbone (position ids default to the local tokens' global
    positions; the MTP head's next-token input is formed globally). Nothing else changes: norms,
    dense FFNs, the MoE, the LM head and the losses are per token and simply run on the local tokens. The MoE's router
    statistics (``MoEStats``) are then local to this cp rank: the trainer must sum them over cp
    (as it sums them over dp) for the expert-bias update and the load-balance loss.

    Apply on the full model before pipeline stages are cut (a stage keeps references to its modules)
    and before data parallelism, after tensor parallelism (without sequence parallelism: CP already
    splits the sequence); a size-1 group leaves every forward on the single-device path. Under TP the
    local heads attend over the gathered latent, whose ``kv_b_proj`` is this tp rank's column shard.

    Args:
        model: ``LongcatFlashForCausalLM`` (or any module holding MLA blocks and a ``LongcatFlashModel``).
        cp_group: the cp group; the same group on every MLA block.
        expanded_kv: ``longcat.model.attention.ExpandedKV``; None = RECOMPUTE (hold only the gathered
            latent). Pass KEEP with layer-level activation checkpointing, which recomputes the block anyway.

    Returns:
        ``model``.

    Raises:
        ValueError: CP already applied, or tensor parallelism with sequence parallelism applied (the
            sequence is already split over cp; LongCat-Flash's own layout, arXiv 2509.01322 §5.3, runs
            attention with CP=8 and no TP).
    """
    expanded_kv = ExpandedKV.RECOMPUTE if expanded_kv is None else ExpandedKV(expanded_kv)

    attentions = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    backbones = [m for m in model.modules() if isinstance(m, LongcatFlashModel)]
    for module in attentions + backbones:
        if module.cp_group is not None:
            raise ValueError("apply_context_parallel: context parallelism is already applied to this model")
    for attention in attentions:
        if getattr(attention.k_rope_region, "sequence_parallel", False):
            raise ValueError(
                "apply_context_parallel: tensor parallelism with sequence parallelism is applied to this model; "
                "context parallelism already splits the sequence: use parallel.sequence_parallel=false with cp"
            )
    for module in attentions + backbones:
        module.cp_group = cp_group
    for attention in attentions:
        attention.cp_expanded_kv = expanded_kv
    return model
