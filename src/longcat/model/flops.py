"""Model FLOPs of one training step (forward + backward) and the GEMMs that carry them.

Convention (what "model FLOPs" means in the utilisation figures; one multiply-add = 2 FLOPs):

    matmul FLOPs    = 6 * T * P_active                 T = B * S tokens of the step
    attention FLOPs = 6 * B * S^2 * H * (K + O) / 2    per attention block (2 per ScMoE layer, +1 MTP)
    model FLOPs     = matmul FLOPs + attention FLOPs

- ``6 = 2 (forward) + 4 (backward: the input gradient and the weight gradient)``, for every weight
  matrix, including the first layer's (its input gradient flows on to the embedding table).
- ``P_active`` counts the *weight-matrix* scalars one token multiplies through: the MLA projections
  (q_a, q_b, kv_a_with_mqa, kv_b, o), the two dense SwiGLU FFNs per layer, the router's classifier
  (N + Z wide), the LM head (V x D, included), the MTP head's eh_proj, MLA, FFN and its second LM
  head pass when ``mtp_num_layers`` = 1, and ``k_e`` FFN experts of 3 * D * I per MoE layer.
  ``k_e`` is the *measured* average number of FFN experts a token chose (from the step's router
  statistics): a zero-computation expert returns its input scaled by its gate, an elementwise op
  counted as 0 FLOPs, so a token routed to z zero experts adds 3 * D * I * (K - z), not * K.
- Not counted (0 FLOPs): the embedding lookup, RMSNorms, RoPE, softmax, SwiGLU's activation and
  product, gate weighting, residual adds, the loss and the optimizer (all elementwise, O(T * D)).
  Norm scales and biases are therefore *not* in ``P_active`` (``count_parameters`` includes them:
  ``active_at(k_e)`` minus the norm and bias scalars equals ``matmul_params_per_token``).
- Attention: the forward ``Q K^T`` ([S, K] x [K, S] per head) and ``P V`` ([S, S] x [S, O]) cost
  ``2 * S^2 * (K + O)`` per head for the full square; causal masking halves it (the
  FlashAttention / Megatron convention: S^2 / 2, not the exact S (S + 1) / 2 lower triangle), and the
  backward costs twice the forward. K = qk_nope_head_dim + qk_rope_head_dim, O = v_head_dim.
- Activation checkpointing's recomputed forward is *not* model FLOPs (hardware FLOPs would add it).

Shape legend:
    B  batch;  S  sequence;  T  B * S tokens
    D  hidden_size;  F  ffn_hidden_size;  I  expert_ffn_hidden_size;  V  vocab_size
    H  num_attention_heads;  Q  q_lora_rank;  C  kv_lora_rank;  A  qk_nope_head_dim
    R  qk_rope_head_dim;  K  A + R;  O  v_head_dim;  N  FFN experts;  Z  zero experts;  E  N + Z
    L  num_layers (ScMoE layers)
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat.config.schema import ModelConfig

FWD_BWD_FACTOR = 6  # 2 forward + 4 backward FLOPs per weight scalar per token


@dataclass(frozen=True)
class LinearSpec:
    """One kind of weight matrix: ``in_features -> out_features``, ``count`` of them per step, each
    applied to ``rows_per_token * T`` rows (1 for dense layers, k_e / N for one FFN expert)."""

    name: str
    in_features: int
    out_features: int
    count: int
    rows_per_token: float = 1.0

    @property
    def params_per_token(self) -> float:
        """Weight scalars one token multiplies through, summed over the ``count`` matrices."""
        return self.in_features * self.out_features * self.count * self.rows_per_token


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step (forward + backward), by component.

    dense_matmul_flops: MLA projections, dense FFNs, router, MTP eh_proj. expert_matmul_flops: the
    chosen FFN experts. lm_head_flops: the LM head (and the MTP head's pass through it).
    attention_flops: causal scores and values. matmul_params_per_token: P_active (see module doc).
    """

    tokens: int
    ffn_experts_per_token: float
    matmul_params_per_token: float
    dense_matmul_flops: float
    expert_matmul_flops: float
    lm_head_flops: float
    attention_flops: float

    @property
    def matmul_flops(self) -> float:
        return self.dense_matmul_flops + self.expert_matmul_flops + self.lm_head_flops

    @property
    def total_flops(self) -> float:
        return self.matmul_flops + self.attention_flops


@dataclass(frozen=True)
class Gemm:
    """A (batched) matrix multiply ``[batch, m, k] x [batch, k, n]`` that a step performs ``count``
    times; ``model_flops`` is its share of ``StepFlops.total_flops`` (causal attention: half of
    ``2 * batch * m * k * n * count``; experts: with the exact fractional rows, ``m`` is rounded)."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    count: int
    model_flops: float

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        return (self.batch, self.m, self.k, self.n)


def num_attention_blocks(cfg: ModelConfig) -> int:
    """Two MLA blocks per ScMoE layer, plus the MTP head's one."""
    return 2 * cfg.num_layers + cfg.mtp_num_layers


def linear_specs(cfg: ModelConfig, *, ffn_experts_per_token: float) -> list[LinearSpec]:
    """Every weight matrix a training step multiplies through (see the module doc for what is left out).

    Raises:
        ValueError: ``ffn_experts_per_token`` outside [0, moe_topk].
    """
    if not 0 <= ffn_experts_per_token <= cfg.moe_topk:
        raise ValueError(f"ffn_experts_per_token={ffn_experts_per_token} must lie in [0, moe_topk={cfg.moe_topk}]")
    D, H, L, M = cfg.hidden_size, cfg.num_attention_heads, cfg.num_layers, cfg.mtp_num_layers
    mla = 2 * L + M
    ffn = 2 * L + M
    expert_rows = ffn_experts_per_token / cfg.n_routed_experts
    specs = [
        LinearSpec("mla.q_a_proj", D, cfg.q_lora_rank, mla),
        LinearSpec("mla.q_b_proj", cfg.q_lora_rank, H * cfg.qk_head_dim, mla),
        LinearSpec("mla.kv_a_proj_with_mqa", D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, mla),
        LinearSpec("mla.kv_b_proj", cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), mla),
        LinearSpec("mla.o_proj", H * cfg.v_head_dim, D, mla),
        LinearSpec("ffn.gate_up_proj", D, cfg.ffn_hidden_size, 2 * ffn),
        LinearSpec("ffn.down_proj", cfg.ffn_hidden_size, D, ffn),
        LinearSpec("router.classifier", D, cfg.num_experts_total, L),
        LinearSpec("expert.gate_up_proj", D, cfg.expert_ffn_hidden_size, 2 * L * cfg.n_routed_experts, expert_rows),
        LinearSpec("expert.down_proj", cfg.expert_ffn_hidden_size, D, L * cfg.n_routed_experts, expert_rows),
        LinearSpec("lm_head", D, cfg.vocab_size, 1 + M),
    ]
    if M:
        specs.append(LinearSpec("mtp.eh_proj", 2 * D, D, M))
    return specs


def matmul_params_per_token(cfg: ModelConfig, *, ffn_experts_per_token: float) -> float:
    """P_active: weight-matrix scalars per token (FFN experts weighted by ``ffn_experts_per_token``)."""
    return sum(s.params_per_token for s in linear_specs(cfg, ffn_experts_per_token=ffn_experts_per_token))


def attention_flops(cfg: ModelConfig, *, batch_size: int, seq_len: int) -> float:
    """Causal score + value FLOPs of one step, all attention blocks: 6 * B * S^2 * H * (K + O) / 2 each."""
    H, K, O = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    per_block = FWD_BWD_FACTOR * batch_size * seq_len**2 * H * (K + O) / 2
    return per_block * num_attention_blocks(cfg)


def step_flops(cfg: ModelConfig, *, batch_size: int, seq_len: int, ffn_experts_per_token: float) -> StepFlops:
    """Model FLOPs of one forward + backward over a [batch_size, seq_len] micro-batch.

    Args:
        cfg: model dims.
        batch_size, seq_len: B and S (T = B * S tokens).
        ffn_experts_per_token: k_e, the measured average FFN experts per token per MoE layer
            (``moe_topk`` without zero experts).

    Raises:
        ValueError: non-positive sizes or k_e outside [0, moe_topk].
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    T = batch_size * seq_len
    specs = linear_specs(cfg, ffn_experts_per_token=ffn_experts_per_token)
    by_kind = {"expert": 0.0, "lm_head": 0.0, "dense": 0.0}
    for spec in specs:
        kind = spec.name.split(".")[0]
        by_kind[kind if kind in by_kind else "dense"] += FWD_BWD_FACTOR * T * spec.params_per_token
    return StepFlops(
        tokens=T,
        ffn_experts_per_token=ffn_experts_per_token,
        matmul_params_per_token=sum(s.params_per_token for s in specs),
        dense_matmul_flops=by_kind["dense"],
        expert_matmul_flops=by_kind["expert"],
        lm_head_flops=by_kind["lm_head"],
        attention_flops=attention_flops(cfg, batch_size=batch_size, seq_len=seq_len),
    )


def gemm_shapes(cfg: ModelConfig, *, batch_size: int, seq_len: int, ffn_experts_per_token: float) -> list[Gemm]:
    """The step's GEMMs at their real shapes; their ``model_flops`` sum to ``step_flops(...).total_flops``.

    Per weight matrix [in -> out] on r rows: forward ``[r, in] x [in, out]``, input gradient
    ``[r, out] x [out, in]``, weight gradient ``[out, r] x [r, in]``. One FFN expert gets
    r = T * k_e / N rows (the average load). Per attention block and head (batch = B * H): forward
    ``Q K^T`` [S, K] x [K, S] and ``P V`` [S, S] x [S, O]; backward ``dO V^T`` [S, O] x [O, S],
    ``P^T dO`` [S, S] x [S, O], ``dS K`` and ``dS^T Q`` [S, S] x [S, K].
    """
    T = batch_size * seq_len
    gemms = []
    for spec in linear_specs(cfg, ffn_experts_per_token=ffn_experts_per_token):
        rows = T * spec.rows_per_token
        if rows <= 0:
            continue
        m = max(1, round(rows))
        flops = 2 * rows * spec.in_features * spec.out_features * spec.count
        i, o = spec.in_features, spec.out_features
        gemms += [
            Gemm(f"{spec.name} fwd", 1, m, i, o, spec.count, flops),
            Gemm(f"{spec.name} dgrad", 1, m, o, i, spec.count, flops),
            Gemm(f"{spec.name} wgrad", 1, o, m, i, spec.count, flops),
        ]
    S, K, O = seq_len, cfg.qk_head_dim, cfg.v_head_dim
    bh, blocks = batch_size * cfg.num_attention_heads, num_attention_blocks(cfg)
    for name, k, n, m in [("scores fwd", K, S, S), ("values fwd", S, O, S), ("dP bwd", O, S, S),
                          ("dV bwd", S, O, S), ("dQ bwd", S, K, S), ("dK bwd", S, K, S)]:
        gemms.append(Gemm(f"attention {name}", bh, m, k, n, blocks, 2 * bh * m * k * n * blocks / 2))
    return gemms
