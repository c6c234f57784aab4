"""LongCat-Flash causal LM (arXiv 2509.01322 §2); numerically equal to HF ``LongcatFlashForCausalLM``.

    h    = embed_tokens(input_ids)
    h, stats_l = DecoderLayer_l(h)           l = 0..num_layers-1 (ScMoE layers, see layer.py)
    logits = lm_head(norm(h));  mtp_logits = lm_head(MTP(h, embed(tok_{t+1})))   (if mtp_num_layers)

Given ``labels_BS`` the forward returns the summed cross-entropy of the head instead of the logits,
fused with the head's GEMM (``longcat.distributed.linear_cross_entropy``): the [B, S, V] logits are
never formed.

State-dict keys follow the checkpoint: ``model.embed_tokens``, ``model.layers.{L}.*``, ``model.norm``,
``model.mtp.*``, ``lm_head`` (the experts are stacked; see ``hf_mapping``).

Shape legend:
    B  batch
    S  sequence
    D  hidden_size
    V  vocab_size
    P  qk_rope_head_dim / 2 rotary pairs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from longcat.config.schema import ModelConfig
from longcat.distributed.context_parallel import cp_local_positions, cp_next_token_ids
from longcat.distributed.linear_cross_entropy import lm_head_cross_entropy_sum
from longcat.model.init import init_weights
from longcat.model.layer import DecoderLayer
from longcat.model.moe import MoEStats
from longcat.model.mtp import MTPHead
from longcat.model.norm import RMSNorm
from longcat.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """logits_BSV: [B, S, V], position t predicts token t+1; None when the forward was given labels.
    mtp_logits_BSV: [B, S, V], position t predicts token t+2 (None without an MTP head, or given labels);
        the last position's input token is wrapped around (see ``LongcatFlashModel.forward``), mask its loss.
    ce_sum: fp32 [], the summed cross-entropy of the head's logits (never formed) against the forward's
        ``labels_BS`` over labelled positions (the fused head + loss; the same on every tp rank); None
        without labels.
    mtp_ce_sum: likewise for the MTP head against ``mtp_labels_BS``; None without an MTP head or those labels.
    last_hidden_BSD: [B, S, D] last decoder layer output *before* the final norm (hidden z-loss, Eq. 10).
    moe_stats: one MoEStats per decoder layer, in layer order.
    logits_vocab_parallel: True under tensor parallelism: logits_BSV and mtp_logits_BSV are then
        [B, S, V/tp], this tp rank's contiguous vocab shard (take the loss with
        ``longcat.distributed.tensor_parallel.vocab_parallel_cross_entropy_sum``); last_hidden_BSD
        stays full [B, S, D], replicated over tp."""

    logits_BSV: torch.Tensor | None
    mtp_logits_BSV: torch.Tensor | None
    last_hidden_BSD: torch.Tensor
    moe_stats: list[MoEStats]
    logits_vocab_parallel: bool = False
    ce_sum: torch.Tensor | None = None
    mtp_ce_sum: torch.Tensor | None = None


@dataclass
class BackboneOutput:
    """last_hidden_BSD: pre-final-norm; normed_BSD: after ``norm``; mtp_hidden_BSD: normed MTP output."""

    last_hidden_BSD: torch.Tensor
    normed_BSD: torch.Tensor
    mtp_hidden_BSD: torch.Tensor | None
    moe_stats: list[MoEStats]


class LongcatFlashModel(nn.Module):
    """``model``: embeddings, decoder layers, final norm and the optional MTP head.

    ``cp_group`` (attribute, set by ``longcat.model.parallel.context_parallel.apply_context_parallel``):
    under context parallelism the inputs are this cp rank's S/cp tokens (``cp_split``); position ids
    None then means their global positions (``cp_local_positions``) and the MTP head's next-token
    input is taken from the global sequence (``cp_next_token_ids``). None or size 1: single device.
    """

    def __init__(self, cfg: ModelConfig, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.qk_rope_head_dim, theta=cfg.rope_theta)
        self.mtp = MTPHead(cfg) if cfg.mtp_num_layers == 1 else None
        self.cp_group: Optional[dist.ProcessGroup] = None

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        *,
        token_mask_BS: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """See ``LongcatFlashForCausalLM.forward``. The MTP input token at position t is
        ``roll(input_ids, -1)[t]`` = tok_{t+1}; at the last position it wraps to tok_0 (its loss is
        masked by the trainer, which has no tok_{S+1} either)."""
        B, S = input_ids_BS.shape
        cp_group = self.cp_group if self.cp_group is not None and self.cp_group.size() > 1 else None
        if cp_group is not None and position_ids_BS is None:
            G = cp_group.size()
            position_ids_BS = cp_local_positions(S * G, cp_rank=cp_group.rank(), cp=G, device=input_ids_BS.device)[None]
        h_BSD = self.embed_tokens(input_ids_BS)
        cos_BSP, sin_BSP = self.rotary_emb(position_ids_BS, seq_len=S, device=h_BSD.device, dtype=h_BSD.dtype)
        use_checkpoint = self.activation_checkpointing and torch.is_grad_enabled()

        h_BSD, moe_stats = run_decoder_layers(
            self.layers, h_BSD, cos_BSP=cos_BSP, sin_BSP=sin_BSP, token_mask_BS=token_mask_BS,
            checkpointed=use_checkpoint,
        )
        mtp_hidden_BSD = None
        if self.mtp is not None:
            next_input_ids_BS = None if cp_group is None else cp_next_token_ids(input_ids_BS, cp_group=cp_group)
            mtp_hidden_BSD = run_mtp(
                self.mtp, self.embed_tokens, h_BSD, input_ids_BS=input_ids_BS, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                checkpointed=use_checkpoint, next_input_ids_BS=next_input_ids_BS,
            )
        return BackboneOutput(
            last_hidden_BSD=h_BSD, normed_BSD=self.norm(h_BSD), mtp_hidden_BSD=mtp_hidden_BSD, moe_stats=moe_stats
        )


def run_decoder_layers(
    layers: Iterable[nn.Module],
    h_BSD: torch.Tensor,
    *,
    cos_BSP: torch.Tensor,
    sin_BSP: torch.Tensor,
    token_mask_BS: torch.Tensor | None,
    checkpointed: bool,
) -> tuple[torch.Tensor, list[MoEStats]]:
    """Run ``layers`` in order: h_BSD [B, S, D] -> (h_BSD [B, S, D], one MoEStats per layer).

    Shared by ``LongcatFlashModel.forward`` and the pipeline stages (``longcat.model.parallel.pipeline``),
    which run a contiguous slice of the layers. With ``checkpointed`` each layer is recomputed in
    backward; its stats are taken from the first forward only (the recompute's are discarded).
    """
    moe_stats = []
    for layer in layers:
        if checkpointed:
            h_BSD, stats = checkpoint(layer, h_BSD, use_reentrant=False, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                                      token_mask_BS=token_mask_BS)
        else:
            h_BSD, stats = layer(h_BSD, cos_BSP=cos_BSP, sin_BSP=sin_BSP, token_mask_BS=token_mask_BS)
        moe_stats.append(stats)
    return h_BSD, moe_stats


def run_mtp(
    mtp: MTPHead,
    embed_tokens: nn.Embedding,
    h_BSD: torch.Tensor,
    *,
    input_ids_BS: torch.Tensor,
    cos_BSP: torch.Tensor,
    sin_BSP: torch.Tensor,
    checkpointed: bool,
    next_input_ids_BS: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The MTP head on the last layer's pre-norm output h_BSD [B, S, D]; returns its normed hidden
    [B, S, D]. Its input token at t is ``roll(input_ids, -1)[t]`` = tok_{t+1} (wrapping at the end),
    or ``next_input_ids_BS`` when given (context parallelism: ``cp_next_token_ids``)."""
    if next_input_ids_BS is None:
        next_input_ids_BS = torch.roll(input_ids_BS, shifts=-1, dims=1)
    next_embeds_BSD = embed_tokens(next_input_ids_BS)
    kwargs = dict(next_embeds_BSD=next_embeds_BSD, cos_BSP=cos_BSP, sin_BSP=sin_BSP)
    if checkpointed:
        return checkpoint(mtp, h_BSD, use_reentrant=False, **kwargs)
    return mtp(h_BSD, **kwargs)


class LongcatFlashForCausalLM(nn.Module):
    """The LongCat-Flash language model: ``model`` (LongcatFlashModel) and ``lm_head``.

    Weights are initialised by ``init_weights(self, cfg)`` at construction (a no-op on the meta
    device; call ``init_weights`` again after ``to_empty``, or with a width_scale). With
    ``tie_word_embeddings`` the LM head and the embedding are one parameter, also after ``to_empty``.

    Args:
        cfg: model dims (validated here).
        activation_checkpointing: recompute each decoder layer (and the MTP block) in backward
            (``torch.utils.checkpoint``, non-reentrant).
    """

    def __init__(self, cfg: ModelConfig, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = LongcatFlashModel(cfg, activation_checkpointing=activation_checkpointing)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Set by ``apply_tensor_parallel``: the LM head then emits this tp rank's vocab shard, and
        # under sequence parallelism the region gathers the (sequence-sharded) last hidden state.
        self.logits_vocab_parallel = False
        self.last_hidden_region: nn.Module = nn.Identity()
        init_weights(self, cfg)

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> LongcatFlashForCausalLM:
        """``nn.Module.to_empty``, then the tied LM head re-pointed at the (new) embedding parameter:
        ``to_empty`` replaces each module's parameters separately, which would untie them."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        return self

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        *,
        token_mask_BS: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
        labels_BS: torch.Tensor | None = None,
        mtp_labels_BS: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Causal LM forward.

        Args:
            input_ids_BS: int64 [B, S] token ids.
            token_mask_BS: bool [B, S], True = real token; None = all real. Padding tokens still flow
                through the model (attention is causal and unmasked: pad on the right) but are left
                out of the router statistics.
            position_ids_BS: int [B, S] RoPE positions; None = 0..S-1 (under context parallelism:
                the local tokens' global positions, ``cp_local_positions``; pass ``cp_split`` of
                custom global positions otherwise).
            labels_BS: int64 [B, S] next-token labels (-100 = none; under TP the same on every tp rank):
                return ``ce_sum`` instead of the logits (fused head + loss, no [B, S, V] logits).
            mtp_labels_BS: int64 [B, S] the MTP head's labels (only with ``labels_BS``): also return
                ``mtp_ce_sum``; None = no MTP loss (its head still runs).

        Raises:
            ValueError: on a malformed input shape or dtype.
        """
        _check_inputs(input_ids_BS, token_mask_BS, position_ids_BS)
        if mtp_labels_BS is not None and labels_BS is None:
            raise ValueError("mtp_labels_BS given without labels_BS: pass both (fused loss) or neither (logits)")
        out = self.model(input_ids_BS, token_mask_BS=token_mask_BS, position_ids_BS=position_ids_BS)
        last_hidden_BSD = self.last_hidden_region(out.last_hidden_BSD)
        if labels_BS is not None:
            mtp_ce_sum = None
            if out.mtp_hidden_BSD is not None and mtp_labels_BS is not None:
                mtp_ce_sum = lm_head_cross_entropy_sum(self.lm_head, out.mtp_hidden_BSD, mtp_labels_BS)
            return ModelOutput(
                logits_BSV=None, mtp_logits_BSV=None, last_hidden_BSD=last_hidden_BSD, moe_stats=out.moe_stats,
                logits_vocab_parallel=self.logits_vocab_parallel,
                ce_sum=lm_head_cross_entropy_sum(self.lm_head, out.normed_BSD, labels_BS), mtp_ce_sum=mtp_ce_sum,
            )
        mtp_logits_BSV = None if out.mtp_hidden_BSD is None else self.lm_head(out.mtp_hidden_BSD)
        return ModelOutput(
            logits_BSV=self.lm_head(out.normed_BSD),
            mtp_logits_BSV=mtp_logits_BSV,
            last_hidden_BSD=last_hidden_BSD,
            moe_stats=out.moe_stats,
            logits_vocab_parallel=self.logits_vocab_parallel,
        )


def _check_inputs(
    input_ids_BS: torch.Tensor, token_mask_BS: torch.Tensor | None, position_ids_BS: torch.Tensor | None
) -> None:
    if input_ids_BS.ndim != 2 or input_ids_BS.dtype.is_floating_point:
        raise ValueError(
            f"input_ids_BS must be an integer [B, S] tensor, got {input_ids_BS.dtype} {tuple(input_ids_BS.shape)}"
        )
    if token_mask_BS is not None and (token_mask_BS.shape != input_ids_BS.shape or token_mask_BS.dtype != torch.bool):
        raise ValueError(
            f"token_mask_BS must be bool {tuple(input_ids_BS.shape)}, got {token_mask_BS.dtype} "
            f"{tuple(token_mask_BS.shape)}"
        )
    B, S = input_ids_BS.shape
    if position_ids_BS is not None and (position_ids_BS.ndim != 2 or position_ids_BS.shape[1] != S
                                        or position_ids_BS.shape[0] not in (1, B)):
        raise ValueError(
            f"position_ids_BS has shape {tuple(position_ids_BS.shape)}; expected ({B}, {S}) or (1, {S})"
        )
