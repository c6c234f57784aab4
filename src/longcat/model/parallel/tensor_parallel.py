"""The tensor-parallel (TP) and sequence-parallel (SP) plan of LongCat-Flash.

``apply_tensor_parallel`` slices a full model (the same weights on every rank) in place into this tp
rank's shards with the generic layers of ``longcat.distributed.tensor_parallel``. Parameters are
plain tensors holding the local shard; names are unchanged.

The plan ("col" = ColumnParallelLinear, "row" = RowParallelLinear; X = A + R or A + O per head):

    model.embed_tokens                        VocabParallelEmbedding  weight [V/tp, D]    Shard(0)
    self_attn.*.q_b_proj, kv_b_proj           col, heads split        weight [H/tp*X, *]  Shard(0)
    self_attn.*.o_proj                        row, heads split        weight [D, H/tp*O]  Shard(1)
    mlps.{0,1}, mtp.mlp: gate_proj, up_proj   col                     weight [F/tp, D]    Shard(0)
    mlps.{0,1}, mtp.mlp: down_proj            row                     weight [D, F/tp]    Shard(1)
    lm_head (tied or not)                     col, vocab split        weight [V/tp, D]    Shard(0)
    q_a_proj, kv_a_proj_with_mqa, eh_proj, every RMSNorm, o_proj bias: replicated
    layers.*.mlp (the MoE): untouched here (see "The MoE interface")

Activations. In MLA the small down-projections and their norms run replicated (SP: on the sequence
shard); the compressed q, the compressed KV and the rope key (``self_attn.k_rope_region``, shared by
every head) enter the tensor-parallel region before the per-head work. The SwiGLU enters once
(``mlps.*.input_region``) for gate_proj and up_proj. Under SP the replicated norms become
``SequenceParallelRMSNorm`` and q_a_proj, kv_a_proj_with_mqa, eh_proj ``SequenceParallelLinear``.

Outputs. Without labels ``logits_BSV`` and ``mtp_logits_BSV`` are [B, S, V/tp], this rank's vocab shard
of the whole sequence (``ModelOutput.logits_vocab_parallel`` True): take the loss with
``vocab_parallel_cross_entropy_sum``. Given labels (the fused head + CE, training's default) the
column-parallel LM head's shard gives ``ce_sum`` / ``mtp_ce_sum`` through
``longcat.distributed.linear_cross_entropy.lm_head_cross_entropy_sum``, vocab-parallel, the same on
every tp rank. ``last_hidden_BSD`` is full [B, S, D] (gathered under SP).

Gradient contract (``longcat.distributed.tensor_parallel``): replicated parameters (norms, q_a_proj,
kv_a_proj_with_mqa, eh_proj, o_proj bias, the router) end the backward with the full
single-process grad, identical on every tp rank. What remains for the caller: dense grads over dp;
expert grads over edp.

The MoE interface. The MoE block (made TP/EP-aware by ``longcat.model.parallel.expert_parallel``)
always takes and returns the full [B, S, D], replicated over tp. The grad arriving at its output is
the full one, identical on every tp rank; it returns the full, identical grad of its input and keeps
the router's grad full (it routes every token on every rank). Each tp rank may run 1/tp of the tokens
through the experts: expert grads are then partial per tp rank and summed over edp, which spans tp
("MoE parallel folding"). Under SP the decoder layer's ``moe_input_region`` (``GatherSequence``)
gathers the sequence-sharded input for it and ``moe_output_region`` (``ScatterSequence``) keeps this
rank's sequence chunk of its output.

Checkpoints. ``tp_param_global_info`` describes every non-expert parameter (``describe_tp_shards``);
experts are described by ``expert_param_global_info``.

Shape legend:
    B  batch; S sequence (S/tp per rank under SP); D hidden_size; V vocab_size; H heads
    F  a column-parallel layer's output features / a row-parallel layer's input features
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.distributed as dist
from torch import nn

from longcat.config.schema import ModelConfig
from longcat.distributed.collectives import copy_to_group
from longcat.distributed.groups import ProcessGroups
from longcat.distributed.tensor_parallel import (
    ColumnParallelLinear,
    EnterParallelRegion,
    GatherSequence,
    RowParallelLinear,
    ScatterSequence,
    SequenceParallelLinear,
    TPShard,
    VocabParallelEmbedding,
    describe_tp_shards,
)
from longcat.model.attention import MultiHeadLatentAttention
from longcat.model.layer import DecoderLayer
from longcat.model.mlp import SwiGLU
from longcat.model.model import LongcatFlashForCausalLM
from longcat.model.moe import GroupedExperts, MoE
from longcat.model.mtp import MTPHead
from longcat.model.norm import RMSNorm, rms_norm

__all__ = ["SequenceParallelRMSNorm", "apply_tensor_parallel", "check_tensor_parallel", "tp_param_global_info"]


class SequenceParallelRMSNorm(RMSNorm):
    """``RMSNorm`` on a sequence shard (SP): its weight's gradient is summed over tp (as
    ``SequenceParallelLinear``). Build with ``from_norm`` (shares the weight)."""

    tp_group: dist.ProcessGroup

    @classmethod
    def from_norm(cls, norm: RMSNorm, *, tp_group: dist.ProcessGroup) -> SequenceParallelRMSNorm:
        module = cls(norm.weight.shape[0], eps=norm.eps)
        module.weight, module.tp_group = norm.weight, tp_group
        return module

    def forward(self, x_xD: torch.Tensor) -> torch.Tensor:
        # [D] weight -> identity; backward all_reduce(tp) of the sequence shards' grads
        return rms_norm(x_xD, copy_to_group(self.weight, group=self.tp_group), eps=self.eps)


# ------------------------------------------------------------------------------- the plan


def check_tensor_parallel(cfg: ModelConfig, *, tp: int) -> None:
    """Check that ``cfg`` splits evenly over ``tp`` ranks.

    Raises:
        ValueError: num_attention_heads, vocab_size or ffn_hidden_size not divisible by tp; the
            message names the numbers and the valid tp degrees.
    """
    for name in ("num_attention_heads", "vocab_size", "ffn_hidden_size"):
        value = getattr(cfg, name)
        if value % tp:
            valid = [d for d in range(1, min(value, 64) + 1) if value % d == 0]
            raise ValueError(
                f"model.{name}={value} is not divisible by tp={tp}: tensor parallelism splits it evenly "
                f"over the tp ranks; choose tp in {valid} (or change {name})"
            )


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name), attr, module)


def _dense_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without anything inside an MoE (its own code parallelises it)."""
    moe_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MoE))
    return [(name, m) for name, m in model.named_modules() if not name.startswith(moe_prefixes)]


class _ShardKwargs(TypedDict):
    """The keywords every ``from_linear`` / ``from_embedding`` call of ``apply_tensor_parallel`` shares."""

    tp_group: dist.ProcessGroup
    sequence_parallel: bool
    memo: dict  # shared, so a tied lm_head gets the embedding's shard


def apply_tensor_parallel(model: LongcatFlashForCausalLM, *, groups: ProcessGroups, sequence_parallel: bool) -> None:
    """Shard a ``LongcatFlashForCausalLM`` over ``groups.tp_group`` in place (see the module docstring).

    Call once, on a model holding the full weights, identical on every rank (same seed or the same
    checkpoint), before building the optimizer (parameters are replaced by their shards) and before
    any data-parallel wrapping. A tp group of size 1 leaves the math exactly single-process.

    Args:
        model: the LongcatFlashForCausalLM (unwrapped).
        groups: supplies ``tp_group``.
        sequence_parallel: shard the residual stream over the sequence (SP); S must then be
            divisible by tp at every forward.

    Raises:
        ValueError: heads, vocab or FFN width not divisible by tp; the model already parallelised.
    """
    tp_group = groups.tp_group
    check_tensor_parallel(model.cfg, tp=tp_group.size())
    if model.logits_vocab_parallel:
        raise ValueError("apply_tensor_parallel was already applied to this model; apply it once")
    sp = sequence_parallel
    col = _ShardKwargs(tp_group=tp_group, sequence_parallel=sp, memo={})

    backbone = model.model
    backbone.embed_tokens = VocabParallelEmbedding.from_embedding(backbone.embed_tokens, **col)
    for _, module in _dense_modules(model):
        if isinstance(module, MultiHeadLatentAttention):
            module.q_b_proj = ColumnParallelLinear.from_linear(module.q_b_proj, **col)
            module.kv_b_proj = ColumnParallelLinear.from_linear(module.kv_b_proj, **col)
            module.o_proj = RowParallelLinear.from_linear(module.o_proj, **col)
            module.k_rope_region = EnterParallelRegion(tp_group=tp_group, sequence_parallel=sp)
            if sp:
                module.q_a_proj = SequenceParallelLinear.from_linear(module.q_a_proj, tp_group=tp_group)
                module.kv_a_proj_with_mqa = SequenceParallelLinear.from_linear(
                    module.kv_a_proj_with_mqa, tp_group=tp_group
                )
        elif isinstance(module, SwiGLU):
            module.input_region = EnterParallelRegion(tp_group=tp_group, sequence_parallel=sp)
            module.gate_proj = ColumnParallelLinear.from_linear(module.gate_proj, input_is_parallel=True, **col)
            module.up_proj = ColumnParallelLinear.from_linear(module.up_proj, input_is_parallel=True, **col)
            module.down_proj = RowParallelLinear.from_linear(module.down_proj, **col)
        elif isinstance(module, DecoderLayer) and sp:
            module.moe_input_region = GatherSequence(tp_group=tp_group)
            module.moe_output_region = ScatterSequence(tp_group=tp_group)
        elif isinstance(module, MTPHead) and sp:
            module.eh_proj = SequenceParallelLinear.from_linear(module.eh_proj, tp_group=tp_group)
    if sp:
        for name, module in _dense_modules(model):
            if type(module) is RMSNorm:
                _set_child(model, name, SequenceParallelRMSNorm.from_norm(module, tp_group=tp_group))
        model.last_hidden_region = GatherSequence(tp_group=tp_group)
    # A tied lm_head gets the embedding's shard (the same rows) through ``memo``.
    model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, **col)
    model.logits_vocab_parallel = True


def tp_param_global_info(model: nn.Module, groups: ProcessGroups) -> dict[str, TPShard]:
    """Every non-expert parameter of ``model`` (``named_parameters`` names, tied ones once) -> its
    place in the global tensor over ``groups.tp_group``.

    Valid before ``apply_tensor_parallel`` too (everything replicated). Call on the unwrapped
    model. Expert weights are left out: ``expert_param_global_info`` describes them (EP).
    """
    return describe_tp_shards(model, tp_group=groups.tp_group, skip_modules=(GroupedExperts,))
