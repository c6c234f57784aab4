"""Multi-token prediction head (arXiv 2509.01322 §2.4; DeepSeek-V3 style, one dense layer, no MoE).

    x   = eh_proj([enorm(embed(tok_{t+1})) ; hnorm(h_t)])        (Linear 2D -> D)
    x   = x + MLA(n_in(x));   x = x + FFN(n_post(x))
    out = norm(x)  -> shared lm_head -> logits predicting tok_{t+2}

``h_t`` is the main model's last hidden state *before* its final norm (DeepSeek-V3 feeds the
un-normed residual stream; ``hnorm`` does the normalisation). The embedding table and the LM head
are the main model's (passed in / applied by the caller).

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
from longcat.model.norm import RMSNorm


class MTPHead(nn.Module):
    """``model.mtp``: enorm, hnorm, eh_proj, input_layernorm, self_attn, post_attention_layernorm,
    mlp (dense SwiGLU, ffn_hidden_size), norm. See ``hf_mapping`` for the released checkpoint names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(D, eps=eps)
        self.hnorm = RMSNorm(D, eps=eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.input_layernorm = RMSNorm(D, eps=eps)
        self.self_attn = MultiHeadLatentAttention(cfg)
        self.post_attention_layernorm = RMSNorm(D, eps=eps)
        self.mlp = SwiGLU(D, intermediate_size=cfg.ffn_hidden_size)
        self.norm = RMSNorm(D, eps=eps)

    def forward(
        self, hidden_BSD: torch.Tensor, *, next_embeds_BSD: torch.Tensor, cos_BSP: torch.Tensor, sin_BSP: torch.Tensor
    ) -> torch.Tensor:
        """hidden_BSD: main model's pre-final-norm output at t; next_embeds_BSD: embedding of tok_{t+1}.
        Returns the normed MTP hidden [B, S, D] (feed to the LM head)."""
        x_BSD = self.eh_proj(torch.cat([self.enorm(next_embeds_BSD), self.hnorm(hidden_BSD)], dim=-1))
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos_BSP=cos_BSP, sin_BSP=sin_BSP)
        x_BSD = x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))
        return self.norm(x_BSD)
