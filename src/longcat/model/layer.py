"""The shortcut-connected MoE (ScMoE) decoder layer (PAPER.md §2, reference ``LongcatFlashDecoderLayer``).

    h   = h + MLA0(n_in0(h))
    u   = n_post0(h);   moe = MoE(u);   h = h + FFN0(u)
    h   = h + MLA1(n_in1(h))
    h   = h + FFN1(n_post1(h)) + moe

The MoE reads the same normed input as FFN0; its output joins at the very end of the layer, which
lets its dispatch/combine overlap the dense half (§5.3).

The MoE always sees and returns the full [B, S, D]. Under sequence parallelism (residual stream
[B, S/tp, D], ``longcat.distributed.tensor_parallel``) ``moe_input_region`` gathers its input over
the sequence and ``moe_output_region`` keeps this rank's sequence shard of its output; both are
identities otherwise.

Shape legend:
    B  batch
    S  sequence
    D  hidden_size
    P  qk_rope_head_dim / 2 rotary pairs
"""

from __future__ import annotations

import torch
from torch import nn

from longcat.config.schema import ModelConfig
from longcat.model.attention import MultiHeadLatentAttention
from longcat.model.mlp import SwiGLU
from longcat.model.moe import MoE, MoEStats
from longcat.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    """Two MLA blocks, two dense SwiGLU FFNs and one MoE; names as in the checkpoint
    (``self_attn.{0,1}``, ``mlps.{0,1}``, ``input_layernorm.{0,1}``, ``post_attention_layernorm.{0,1}``,
    ``mlp``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = nn.ModuleList([MultiHeadLatentAttention(cfg) for _ in range(2)])
        self.mlps = nn.ModuleList([SwiGLU(D, intermediate_size=cfg.ffn_hidden_size) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(D, eps=eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(D, eps=eps) for _ in range(2)])
        self.mlp = MoE(cfg)
        self.moe_input_region: nn.Module = nn.Identity()
        self.moe_output_region: nn.Module = nn.Identity()

    def forward(
        self,
        h_BSD: torch.Tensor,
        *,
        cos_BSP: torch.Tensor,
        sin_BSP: torch.Tensor,
        token_mask_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats]:
        """h_BSD [B, S, D] -> (h_BSD [B, S, D], this layer's MoEStats)."""
        h_BSD = h_BSD + self.self_attn[0](self.input_layernorm[0](h_BSD), cos_BSP=cos_BSP, sin_BSP=sin_BSP)
        u_BSD = self.post_attention_layernorm[0](h_BSD)
        moe_BSD, stats = self.mlp(self.moe_input_region(u_BSD), token_mask_BS=token_mask_BS)
        moe_BSD = self.moe_output_region(moe_BSD)
        h_BSD = h_BSD + self.mlps[0](u_BSD)
        h_BSD = h_BSD + self.self_attn[1](self.input_layernorm[1](h_BSD), cos_BSP=cos_BSP, sin_BSP=sin_BSP)
        h_BSD = h_BSD + self.mlps[1](self.post_attention_layernorm[1](h_BSD)) + moe_BSD
        return h_BSD, stats
