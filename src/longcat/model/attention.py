"""Multi-head latent attention, MLA (PAPER.md §2.3.1, Eq. 6-7; DeepSeek-V2/V3 with a q LoRA).

    q  = q_b_proj(q_a_layernorm(q_a_proj(x))) * sqrt(D / Q)            (both q parts scaled)
    [c, k_rope] = kv_a_proj_with_mqa(x)                                 (c: the compressed KV latent)
    [k_nope, v] = kv_b_proj(kv_a_layernorm(c) * sqrt(D / C))            (per head; k_rope unscaled)
    out = o_proj(softmax(q k^T * K^-0.5 + causal) v)

Padding is not masked inside attention: with right padding (or packed documents) causal attention
never lets a real token see a later padding token.

Under tensor parallelism (``longcat.model.parallel.tensor_parallel``) q_b_proj / kv_b_proj hold this
rank's heads and o_proj their input columns, so H below is the local head count; with sequence
parallelism x_BSD is a sequence shard and the head projections gather the whole sequence. The
forward therefore takes H and S from the projected tensors, not from the config or x_BSD.

Shape legend:
    B  batch
    S  sequence
    D  hidden_size
    H  num_attention_heads
    Q  q_lora_rank
    C  kv_lora_rank (compressed KV latent)
    A  qk_nope_head_dim (dims without positional encoding)
    R  qk_rope_head_dim (rotated dims; the rope key is shared by all heads)
    P  R / 2 rotary pairs
    K  A + R, query/key head dim
    O  v_head_dim (value / output dim per head)
    H is the local head count under tensor parallelism (see above).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat.config.schema import ModelConfig, mla_scales
from longcat.model.norm import RMSNorm
from longcat.model.rope import apply_interleaved_rope

# The reference builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps (1e-6), not
# rms_norm_eps; the released checkpoint was trained that way.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """One MLA block; submodule names match the checkpoint (``self_attn.{0,1}.*``).

    Args:
        cfg: model dims; ``cfg.attention_bias`` adds biases to q_a_proj, kv_a_proj_with_mqa, o_proj.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_head_dim = cfg.qk_head_dim
        self.softmax_scale = self.qk_head_dim**-0.5
        self.q_scale, self.kv_scale = mla_scales(cfg)
        bias = cfg.attention_bias

        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=bias)
        # The rope key is shared by every head: under tensor parallelism this region sums its
        # gradient over the tp ranks' heads (and gathers the sequence under SP). Identity otherwise.
        self.k_rope_region: nn.Module = nn.Identity()

    def forward(self, x_BSD: torch.Tensor, *, cos_BSP: torch.Tensor, sin_BSP: torch.Tensor) -> torch.Tensor:
        """Causal self-attention. x_BSD [B, S, D]; cos/sin [B or 1, S, P] -> [B, S, D].

        (Under sequence parallelism x_BSD and the output are [B, S/tp, D] and cos/sin cover all S.)"""
        A, R, O = self.nope_dim, self.rope_dim, self.v_dim

        q_BSX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        B, S = q_BSX.shape[:2]
        q_BSHK = q_BSX.view(B, S, -1, A + R) * self.q_scale
        q_nope_BSHA, q_rope_BSHR = q_BSHK.split([A, R], dim=-1)
        H = q_BSHK.shape[2]

        latent_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, R], dim=-1)
        k_rope_BSR = self.k_rope_region(k_rope_BSR)
        latent_BSC = self.kv_a_layernorm(latent_BSC) * self.kv_scale
        k_nope_BSHA, v_BSHO = self.kv_b_proj(latent_BSC).view(B, S, H, A + O).split([A, O], dim=-1)

        q_rope_BSHR = apply_interleaved_rope(q_rope_BSHR, cos_BSP=cos_BSP, sin_BSP=sin_BSP)
        k_rope_BS1R = apply_interleaved_rope(k_rope_BSR.unsqueeze(2), cos_BSP=cos_BSP, sin_BSP=sin_BSP)

        q_BSHK = torch.cat([q_nope_BSHA, q_rope_BSHR], dim=-1)
        k_BSHK = torch.cat([k_nope_BSHA, k_rope_BS1R.expand(B, S, H, R)], dim=-1)
        out_BHSO = F.scaled_dot_product_attention(
            q_BSHK.transpose(1, 2),
            k_BSHK.transpose(1, 2),
            v_BSHO.transpose(1, 2),
            is_causal=True,
            scale=self.softmax_scale,
        )
        return self.o_proj(out_BHSO.transpose(1, 2).reshape(B, S, H * O))
