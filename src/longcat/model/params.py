"""Analytic parameter counts (arXiv 2509.01322 §2: 560B total; 18.6B active with 0 FFN experts per token,
31.3B with 12).

Convention, which reproduces the paper's figures: *total* counts every parameter of the module
(embedding, LM head, MTP head when configured); *active* counts what one token's forward touches
through matrix multiplies: everything except the input embedding table (a lookup), the MTP head
(a training/drafting aux head) and the FFN experts it did not choose. The router width, norms and
the dense FFNs are always active. Buffers (the expert bias) are not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat.config.schema import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one config (numbers of scalars).

    total: all parameters, as ``sum(p.numel() for p in model.parameters())``.
    active_min / active_max: active parameters per token with 0 / moe_topk FFN experts per layer.
    per_expert: one FFN expert (3 * D * I). num_layers: MoE layers. embedding: the input table
    (0 extra if tied: then counted once, as the active LM head). mtp: the MTP head (in total only).
    """

    total: int
    active_min: int
    active_max: int
    per_expert: int
    num_layers: int
    embedding: int
    mtp: int

    def active_at(self, k_e: float) -> float:
        """Active parameters with an average of ``k_e`` FFN experts per token per layer."""
        return self.active_min + k_e * self.num_layers * self.per_expert


def _mla_params(cfg: ModelConfig) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    bias = int(cfg.attention_bias)
    q = D * cfg.q_lora_rank + bias * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    kv_a_out = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    kv = D * kv_a_out + bias * kv_a_out + cfg.kv_lora_rank + kv_b
    o = H * cfg.v_head_dim * D + bias * D
    return q + kv + o


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Counts computed from ``cfg`` alone (no module is built)."""
    D = cfg.hidden_size
    mla = _mla_params(cfg)
    dense_ffn = 3 * D * cfg.ffn_hidden_size
    per_expert = 3 * D * cfg.expert_ffn_hidden_size
    router = D * cfg.num_experts_total
    layer_dense = 2 * mla + 2 * dense_ffn + 4 * D + router
    embedding = cfg.vocab_size * D
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * D
    mtp = 0
    if cfg.mtp_num_layers == 1:
        mtp = 2 * D + 2 * D * D + 2 * D + mla + dense_ffn + D  # enorm, hnorm, eh_proj, 2 pre-norms, norm

    active_min = cfg.num_layers * layer_dense + D + cfg.vocab_size * D  # + final norm + LM head
    total = embedding + lm_head + cfg.num_layers * (layer_dense + cfg.n_routed_experts * per_expert) + D + mtp
    return ParamCount(
        total=total,
        active_min=active_min,
        active_max=active_min + cfg.num_layers * cfg.moe_topk * per_expert,
        per_expert=per_expert,
        num_layers=cfg.num_layers,
        embedding=embedding,
        mtp=mtp,
    )
