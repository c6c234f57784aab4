"""Multi-head latent attention, MLA (arXiv 2509.01322 §2.3.1, Eq. 6-7; DeepSeek-V2/V3 with a q LoRA).

    q  = q_b_proj(q_a_layernorm(q_a_proj(x))) * sqrt(D / Q)            (both q parts scaled)
    [c, k_rope] = kv_a_proj_with_mqa(x)                                 (c: the compressed KV latent)
    [k_nope, v] = kv_b_proj(kv_a_layernorm(c) * sqrt(D / C))            (per head; k_rope unscaled)
    out = o_proj(softmax(q k^T * K^-0.5 + causal) v)

Padding is not masked inside attention: with right padding (or packed documents) causal attention
never lets a real token see a later padding token. Packed documents are not separated either: the
window is one causal sequence, with or without context parallelism.

Context parallelism (``cp_group`` set by ``longcat.model.parallel.context_parallel.apply_context_parallel``):
x_BSD holds this cp rank's N = S/cp tokens (global chunks r and 2cp-1-r of 2cp, see
``context_parallel``), cos/sin the RoPE tables of their *global* positions. Each rank exchanges only
the compressed KV state, the normed and scaled latent plus the rotated rope key (Z = C + R = 576
values per token for LongCat-Flash, against H * (K + O) = 20,480 for expanded keys and values):

    [c, k_rope] of the local tokens (RoPE at their global positions)
    -> all-gather over cp (backward: reduce-scatter of the grads) -> global order [B, S, Z]
    -> kv_b_proj over the key prefix the local queries can see, [0, (2cp-r)L) on rank r
    -> per local query chunk c: softmax(q k^T) v over keys [0, (c+1)L), causal mask aligned to the
       chunk's global end (by default the expansion and attention are recomputed in backward)

The math is the single-device attention's (no approximation); only the summation order differs.
Why this exchange rather than all-gathering expanded K/V or a K/V ring: ``_forward_context_parallel``.

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
    N  local tokens on this cp rank under context parallelism (S / cp; two chunks of L = N / 2)
    T  keys in a query chunk's causal prefix under context parallelism ((c + 1) * L for global chunk c)
    Z  C + R, one token's compressed KV state (latent + rotated rope key), the values exchanged under CP
"""

from __future__ import annotations

import enum
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from longcat.config.schema import ModelConfig, mla_scales
from longcat.distributed.context_parallel import cp_all_gather_sequence, cp_chunk_ids
from longcat.model.norm import RMSNorm
from longcat.model.rope import apply_interleaved_rope

# The reference builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps (1e-6), not
# rms_norm_eps; the released checkpoint was trained that way.
LATENT_NORM_EPS = 1e-6


def causal_attention(q_BHSK: torch.Tensor, k_BHSK: torch.Tensor, v_BHSO: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Causal ``F.scaled_dot_product_attention``: q, k [B, H, S, K], v [B, H, S, O] -> [B, H, S, O].

    On CPU, when O < K (MLA: v_head_dim 128 against qk_nope + qk_rope = 192 in LongCat-Flash), v is
    zero-padded to K and the output's padded columns (zeros) are dropped: SDPA's CPU flash kernel needs
    equal head dims, and without it SDPA takes its math path (bmm, softmax, a materialised causal
    mask, and under bf16 autocast an upcast of q, k, v to fp32). In fp32 the result is the same
    attention with another kernel's summation order. In bf16 the flash kernel keeps bf16 operands for
    its matmuls, as flash attention does on GPUs, where the math path computed everything in fp32: its
    forward error against fp64 is the same, its dk / dv errors 3-5x larger and growing with S (dk
    1.2e-2 vs 2.7e-3 at S = 4096). Padding adds (K - O) / (K + O) to the attention FLOPs.
    Measured (forward + backward, B 8, H 8, S 256, K 96, O 64, one thread, Xeon with AMX): 62 vs 78 ms
    fp32, 53 vs 88 ms bf16; the ``small`` training step 7% faster fp32, 21% bf16. On the AMD EPYC of
    earlier runs the fp32 attention was level (81.5 vs 82.5 ms). On CUDA SDPA picks its kernel itself
    (the memory-efficient and cuDNN kernels take O != K), so nothing is padded there.
    """
    K, O = q_BHSK.shape[-1], v_BHSO.shape[-1]
    pad = q_BHSK.device.type == "cpu" and O < K
    if pad:
        v_BHSO = F.pad(v_BHSO, (0, K - O))
    out_BHSO = F.scaled_dot_product_attention(q_BHSK, k_BHSK, v_BHSO, is_causal=True, scale=scale)
    return out_BHSO[..., :O] if pad else out_BHSO


class ExpandedKV(enum.Enum):
    """What a cp rank does with the keys and values it expands from the gathered latent.

    RECOMPUTE: drop them after the forward and recompute expansion and attention in backward
        (``torch.utils.checkpoint``): only the gathered [B, S, C + R] latent is held. The default:
        at long context the busiest rank's expanded prefix is S * H * (K + O) values per block.
    KEEP: hold them for the backward like the single-device path (fewer FLOPs, more memory); the
        right choice under layer-level activation checkpointing, which recomputes the block anyway.
    """

    RECOMPUTE = "recompute"
    KEEP = "keep"


class MultiHeadLatentAttention(nn.Module):
    """One MLA block; submodule names match the checkpoint (``self_attn.{0,1}.*``).

    Args:
        cfg: model dims; ``cfg.attention_bias`` adds biases to q_a_proj, kv_a_proj_with_mqa, o_proj.

    Attributes:
        cp_group: the context-parallel group (set by ``apply_context_parallel``); None, or a size-1
            group, runs the single-device path, untouched. See the module docstring for what the
            caller passes under CP.
        cp_expanded_kv: ``ExpandedKV`` (under CP only; set by ``apply_context_parallel``).
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
        self.cp_group: Optional[dist.ProcessGroup] = None
        self.cp_expanded_kv = ExpandedKV.RECOMPUTE

    def forward(self, x_BSD: torch.Tensor, *, cos_BSP: torch.Tensor, sin_BSP: torch.Tensor) -> torch.Tensor:
        """Causal self-attention. x_BSD [B, S, D]; cos/sin [B or 1, S, P] -> [B, S, D].

        (Under sequence parallelism x_BSD and the output are [B, S/tp, D] and cos/sin cover all S.
        Under context parallelism x_BSD, cos/sin and the output cover this cp rank's S/cp local tokens,
        cos/sin at their global positions: ``_forward_context_parallel``.)"""
        if self.cp_group is not None and self.cp_group.size() > 1:
            return self._forward_context_parallel(x_BSD, cos_BNP=cos_BSP, sin_BNP=sin_BSP)
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
        out_BHSO = causal_attention(q_BSHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHO.transpose(1, 2),
                                    scale=self.softmax_scale)
        return self.o_proj(out_BHSO.transpose(1, 2).reshape(B, S, H * O))

    def _forward_context_parallel(
        self, x_BND: torch.Tensor, *, cos_BNP: torch.Tensor, sin_BNP: torch.Tensor
    ) -> torch.Tensor:
        """Exact causal MLA over the cp group: x_BND [B, N, D] local tokens -> [B, N, D].

        Args:
            x_BND: this cp rank's tokens (``cp_split`` of the global [B, S, D]: chunks r, 2cp-1-r).
            cos_BNP, sin_BNP: [B or 1, N, P] RoPE tables of the local tokens' *global* positions
                (``cp_local_positions``).

        Every rank of ``cp_group`` must call this with the same B and N (a collective inside).

        The exchange (arXiv 2509.01322 §5.3: attention under CP=8, no TP; the long-context stage goes
        to 128k tokens). MLA's KV state before ``kv_b_proj`` is Z = C + R = 576 values per token; the
        expanded keys and values are H * (K + O) = 64 * (192 + 128) = 20,480. Per rank per MLA block,
        cp = 8, bf16, one sequence, bytes sent forward (backward the same again as a reduce-scatter):
          (i)   all-gather of [latent, rope key] (this):   7/8 * S * 576 * 2 B:   31.5 MiB (32k), 126 MiB (128k);
          (ii)  all-gather of expanded K/V (Llama 3's CP): 7/8 * S * 20480 * 2 B: 1120 MiB (32k), 4480 MiB (128k),
                and the gathered K/V are held for the backward;
          (iii) ring of K/V blocks (Megatron's CP): the bytes of (ii) in cp - 1 steps that overlap the
                attention, and K/V plus their gradients around the ring in backward (2x).
        (i) moves 35.6x fewer bytes. In LongCat-Flash the cp group sits inside the EP group, whose
        links already carry the MoE all-to-all that ScMoE works to hide; (i) leaves them to it, and
        needs no partial-softmax merging (stock SDPA, exact). Its price is ``kv_b_proj`` work: rank r
        expands the (2cp - r) L keys its queries can see (rank 0: all S) instead of its own 2L;
        with the default recompute, on the busiest rank that is 24% of the block's attention FLOPs at
        32k and 6% at 128k (18% / 4.4% with ``ExpandedKV.KEEP``), or 10% / 4.5% of a decoder layer's
        FLOPs, paid in GEMMs rather than on the link. Where the link has headroom and attention is
        long enough to hide a ring's bytes (128k), (iii) is the alternative to measure on the real
        interconnect. Never expanding (absorbing ``kv_b_proj`` into the queries, attention over
        576-dim keys and 512-dim values) would cost 3-4x the attention FLOPs. Tabulated and measured
        by ``longcat.bench.context_parallel`` (docs/benchmarks.md).

        Compute: every local query chunk (global chunk c) attends only to its causal key prefix
        [0, (c+1)L) with the causal mask aligned to the prefix's end (``causal_lower_right``; the
        first chunk's is the plain square mask), so no rank computes scores it can never use. The
        prefix is expanded once for both chunks. With ``cp_expanded_kv`` RECOMPUTE (default) the
        expansion and the attention run under ``torch.utils.checkpoint``: the expanded
        [B, T, H, K + O] keys and values are recomputed in backward rather than held.
        """
        A, R, C = self.nope_dim, self.rope_dim, self.kv_lora_rank
        cp_group = self.cp_group
        assert cp_group is not None
        G, r = cp_group.size(), cp_group.rank()
        B, N = x_BND.shape[:2]
        if N % 2:
            raise ValueError(
                f"MLA under context parallelism: {N} local tokens is odd; each cp rank holds two chunks of "
                f"S/(2*cp) tokens: split the batch with longcat.distributed.context_parallel.cp_split"
            )
        L = N // 2

        q_BNX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BND)))
        q_BNHK = q_BNX.view(B, N, -1, A + R) * self.q_scale
        q_nope_BNHA, q_rope_BNHR = q_BNHK.split([A, R], dim=-1)
        q_rope_BNHR = apply_interleaved_rope(q_rope_BNHR, cos_BSP=cos_BNP, sin_BSP=sin_BNP)
        q_BNHK = torch.cat([q_nope_BNHA, q_rope_BNHR], dim=-1)

        latent_BNC, k_rope_BNR = self.kv_a_proj_with_mqa(x_BND).split([C, R], dim=-1)
        # Under TP (no SP) the rope key feeds only this rank's heads: the region sums its grad over tp.
        # (The latent's enters through kv_b_proj's column-parallel input.)
        k_rope_BNR = self.k_rope_region(k_rope_BNR)
        latent_BNC = self.kv_a_layernorm(latent_BNC) * self.kv_scale
        k_rope_BNR = apply_interleaved_rope(k_rope_BNR.unsqueeze(2), cos_BSP=cos_BNP, sin_BSP=sin_BNP).squeeze(2)
        # [B, N, Z] local, chunks (r, 2cp-1-r) -> all_gather(cp, dim 1) + reorder -> [B, S, Z] global
        # order; backward: reduce_scatter(cp) of the [B, S, Z] grads -> [B, N, Z]
        kv_BSZ = cp_all_gather_sequence(torch.cat([latent_BNC, k_rope_BNR], dim=-1), seq_dim=1, cp_group=cp_group)

        low, high = cp_chunk_ids(cp_rank=r, cp=G)
        # Only keys up to the high chunk's end are ever seen here: [0, (high + 1) L) = [0, (2cp - r) L).
        kv_BTZ = kv_BSZ[:, :(high + 1) * L]
        if torch.is_grad_enabled() and self.cp_expanded_kv is ExpandedKV.RECOMPUTE:
            out_BNHO = checkpoint(self._attend_local_chunks, q_BNHK, kv_BTZ, (low + 1) * L, use_reentrant=False)
        else:
            out_BNHO = self._attend_local_chunks(q_BNHK, kv_BTZ, (low + 1) * L)
        return self.o_proj(out_BNHO.reshape(B, N, -1))

    def _attend_local_chunks(self, q_BNHK: torch.Tensor, kv_BTZ: torch.Tensor, low_keys: int) -> torch.Tensor:
        """The local queries [B, N, H, K] (two chunks of L) against the compressed key prefix [B, T, Z]
        of the high chunk: expand it once with ``kv_b_proj``; the low chunk attends to its first
        ``low_keys`` keys, the high chunk to all T; each chunk's queries are the last L positions of
        its prefix (causal mask aligned bottom-right). Returns [B, N, H, O]."""
        A, R, O = self.nope_dim, self.rope_dim, self.v_dim
        B, N, H = q_BNHK.shape[:3]
        L, T = N // 2, kv_BTZ.shape[1]
        latent_BTC, k_rope_BTR = kv_BTZ.split([self.kv_lora_rank, R], dim=-1)
        k_nope_BTHA, v_BTHO = self.kv_b_proj(latent_BTC).view(B, T, H, A + O).split([A, O], dim=-1)
        k_BHTK = torch.cat([k_nope_BTHA, k_rope_BTR.unsqueeze(2).expand(B, T, H, R)], dim=-1).transpose(1, 2)
        v_BHTO = v_BTHO.transpose(1, 2)
        q_BHNK = q_BNHK.transpose(1, 2)
        device_type = q_BHNK.device.type
        if torch.is_autocast_enabled(device_type):
            # What autocast does for the single-device path's SDPA call. With a CausalBias mask SDPA
            # bypasses autocast's casts, and q, k (fp32: the scales and the fp32 RoPE tables promote
            # them) would meet a bf16 v.
            dtype = torch.get_autocast_dtype(device_type)
            q_BHNK, k_BHTK, v_BHTO = q_BHNK.to(dtype), k_BHTK.to(dtype), v_BHTO.to(dtype)
        out_chunks = []
        for slot, keys in enumerate((low_keys, T)):
            # Query i of the chunk sits at prefix position keys - L + i and sees keys 0 .. keys - L + i.
            out_chunks.append(F.scaled_dot_product_attention(
                q_BHNK[:, :, slot * L:(slot + 1) * L],
                k_BHTK[:, :, :keys],
                v_BHTO[:, :, :keys],
                attn_mask=causal_lower_right(L, keys),
                scale=self.softmax_scale,
            ))
        return torch.cat(out_chunks, dim=2).transpose(1, 2)
