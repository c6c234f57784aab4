"""Memory of one rank in a training step: model state (exact, from the real shards) and activations
(modelled).

Model state, as the trainer holds it (``longcat.train``): parameters are fp32 (``train.bf16`` is
autocast: the matmuls run in bf16, the stored weights stay fp32 and *are* the master weights, so no
separate master copy exists); gradients fp32, one per local parameter; ``torch.optim.AdamW`` keeps
``exp_avg`` and ``exp_avg_sq`` (fp32, the parameter's local shape) and a 0-d fp32 ``step`` per tensor.
Under FSDP2 every one of them is this rank's 1/dp (experts 1/edp) shard, which the counts from
``planning.shard`` already are.

Activations (saved for backward), per micro-batch, in elements per token of one ScMoE layer, with the
legend of ``longcat.model.flops`` and the local sizes ``Hl = H / tp``, ``Fl = F / tp``, ``k_e`` FFN
experts per token (Eq. 2's target, ``moe.expected_ffn_experts``)::

    MLA   = 2 D + 2 Q + (C + R) + 2 C + 4 Hl K + Hl (A + O) + 3 Hl O       (norm in/out, low-rank
            paths and their norms, q / k / v, attention output, o_proj input)
    FFN   = 2 D + 4 Fl                                                     (norm in/out, gate, up, act, product)
    MoE   = 2 E (fp32 logits, probs) + k_e (3 D + 4 I)                     (permuted in, expert GEMMs, combine)
    layer = 2 MLA + 2 FFN + MoE

Tokens per rank per micro-batch: ``B * S / cp``; the MoE's share under TP is 1/tp of them. Bytes per
element: 2 under bf16 autocast, else 4. The last stage adds the head (``head_activation_bytes_per_token``;
with the fused head + CE, the default, no logits, and a weight-sized fp32 buffer only when it forms the
gradients in forward, ``fused_head_fixed_bytes``).
With activation checkpointing (``train.activation_checkpointing``: every layer recomputed in
backward) a layer keeps only its input (``D`` per token) and one layer at a time is materialised again.
Under CP each rank also holds, per MLA block, the all-gathered latent of the sequence (``(C + R) S``
per sequence, arXiv 2509.01322 §5.3's exchange, ``ExpandedKV.RECOMPUTE``).

Micro-batches in flight, each holding the activations of this rank's layers that it has run forward
but not yet backward (``in_flight_layer_passes``): 1 without PP (gradient accumulation runs them one
after the other); 1F1B: ``min(pp - pp_rank, M)`` micro-batches of this rank's layers; interleaved 1F1B
(Megatron's warm-up count): ``min((pp - pp_rank - 1) * 2 + (v - 1) * pp + 1, v M)`` passes of one
virtual stage; ZB-V (V-shape, balanced memory, arXiv 2401.10241 §4): ``2 pp`` passes of one of the two
chunks, the same on every rank, i.e. the first 1F1B stage's figure.

The constants were checked against the tensors autograd saves for the small preset
(tests/unit/planning/test_memory.py); the whole estimate against the measured peak RSS growth of real
steps (tests/integration/test_dry_run_measured.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat.config.schema import DPMode, LMHeadCE, ModelConfig, PipelineSchedule, RunConfig
from longcat.distributed.linear_cross_entropy import chunk_rows_for, grads_in_forward
from longcat.planning.shard import RankShard

__all__ = [
    "ActivationEstimate",
    "StateBytes",
    "activation_estimate",
    "PlanView",
    "cp_degree",
    "fused_head_chunk_bytes",
    "fused_head_fixed_bytes",
    "head_activation_bytes_per_token",
    "in_flight_layer_passes",
    "layer_activation_elements_per_token",
    "state_bytes",
]

FP32 = 4
ADAM_MOMENTS = 2


def cp_degree(run_cfg: RunConfig) -> int:
    """The context-parallel degree of ``run_cfg`` (1 until ``parallel.cp`` exists in the schema)."""
    return int(getattr(run_cfg.parallel, "cp", 1))


@dataclass(frozen=True)
class PlanView:
    """The degrees the memory and communication models read, beyond the built shard.

    cp: context-parallel degree (``parallel.cp``, or a planning assumption while the schema lacks it).
    dense_grad_group: ranks that sum dense gradients (dp x cp).
    num_microbatches: micro-batches of B sequences (each split over cp) per step on this rank.
    """

    cp: int
    dense_grad_group: int
    num_microbatches: int


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model state on one rank.

    weights: fp32 parameters (also the master weights). grads: fp32 gradients. optimizer: AdamW's
    two fp32 moments plus a 4-byte step per tensor. master: a separate master copy (0: none here).
    """

    weights: int
    grads: int
    optimizer: int
    master: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.master


def state_bytes(shard: RankShard, *, dp_mode: DPMode = DPMode.replicate, zero_stage: int = 2) -> StateBytes:
    """Weights, gradients and optimizer state of ``shard``'s rank (see the module doc).

    ``dp_mode=deepspeed`` (modelled, not measured): ZeRO keeps fp32 master partitions and the AdamW
    moments of 1/dp of the parameters (two step tensors per partition group are ignored), and under
    stage 2 also only 1/dp of the gradients; the module's own fp32 weights stay whole.
    """
    n = shard.params.total
    if DPMode(dp_mode) is DPMode.deepspeed:
        dp = shard.dims.dp
        return StateBytes(weights=FP32 * n, grads=FP32 * n // (dp if zero_stage == 2 else 1),
                          optimizer=ADAM_MOMENTS * FP32 * n // dp, master=FP32 * n // dp)
    return StateBytes(weights=FP32 * n, grads=FP32 * n,
                      optimizer=ADAM_MOMENTS * FP32 * n + FP32 * shard.num_param_tensors)


def _mla_elements(cfg: ModelConfig, *, tp: int) -> float:
    D, Q, C, R = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Hl, K, A, O = cfg.num_attention_heads / tp, cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    return 2 * D + 2 * Q + (C + R) + 2 * C + 4 * Hl * K + Hl * (A + O) + 3 * Hl * O


def _ffn_elements(cfg: ModelConfig, *, tp: int) -> float:
    return 2 * cfg.hidden_size + 4 * cfg.ffn_hidden_size / tp


def _moe_elements(cfg: ModelConfig, *, k_e: float) -> float:
    return 2 * cfg.num_experts_total + k_e * (3 * cfg.hidden_size + 4 * cfg.expert_ffn_hidden_size)


def layer_activation_elements_per_token(cfg: ModelConfig, *, tp: int, k_e: float) -> float:
    """Elements one ScMoE layer saves for backward per local token (module doc; the MoE's 1/tp share
    of the tokens is folded in)."""
    return 2 * _mla_elements(cfg, tp=tp) + 2 * _ffn_elements(cfg, tp=tp) + _moe_elements(cfg, k_e=k_e) / tp


def head_activation_bytes_per_token(cfg: ModelConfig, *, tp: int, bytes_per: int, fused: bool = False) -> float:
    """The last stage's head per local token, in bytes: final norm in/out and the LM head's input
    (``bytes_per`` each), then with the logits path (``loss.lm_head_ce=logits``) the logits (``V / tp`` at
    ``bytes_per``), the loss's fp32 log-softmax and, in backward, the fp32 logits gradient; with the
    fused head (``fused``) ``D`` values at ``bytes_per`` (the input's gradient formed in forward, or the
    input kept for the recompute) and an fp32 log-sum-exp (its weight-sized buffer, when the gradients
    are formed in forward, is ``fused_head_fixed_bytes``). The MTP head (one MLA block, one FFN,
    ``eh_proj`` and its own head loss) doubles the head part."""
    per_head: float = 2 * cfg.hidden_size * bytes_per
    per_head += cfg.hidden_size * bytes_per + FP32 if fused else cfg.vocab_size / tp * (bytes_per + 2 * FP32)
    if cfg.mtp_num_layers:
        mtp_block = (4 * cfg.hidden_size + _mla_elements(cfg, tp=tp) + _ffn_elements(cfg, tp=tp)) * bytes_per
        return 2 * per_head + mtp_block
    return per_head


def fused_head_fixed_bytes(cfg: ModelConfig, *, tp: int, tokens: float, device_type: str = "cpu",
                           mtp_loss: bool = True) -> float:
    """What the fused head + CE holds per micro-batch of ``tokens`` local tokens beyond its per-token
    part: the fp32 gradient of the LM head's weight shard [V/tp, D] when it forms the gradients in
    forward (``grads_in_forward``: tokens >= D), one per head with a loss (the MTP head's is a second
    when ``mtp_loss``), plus ``fused_head_chunk_bytes``."""
    fixed = fused_head_chunk_bytes(cfg, tp=tp, tokens=tokens, device_type=device_type)
    if grads_in_forward(int(tokens), cfg.hidden_size):
        heads = 2 if cfg.mtp_num_layers and mtp_loss else 1
        fixed += heads * cfg.vocab_size / tp * cfg.hidden_size * FP32
    return fixed


def fused_head_chunk_bytes(cfg: ModelConfig, *, tp: int, tokens: float, device_type: str = "cpu") -> float:
    """The fused head's transient: one chunk's fp32 logits [c, V/tp] and their softmax, c =
    ``chunk_rows_for(V/tp)`` on ``device_type`` (at most ``tokens``)."""
    vocab_local = cfg.vocab_size // tp
    rows = min(chunk_rows_for(vocab_local, device_type=device_type), max(int(tokens), 1))
    return 2 * rows * vocab_local * FP32


def in_flight_layer_passes(*, schedule: PipelineSchedule, pp: int, pp_rank: int, num_microbatches: int,
                           num_local_layers: int) -> float:
    """Layer-passes (one micro-batch through one local layer) whose activations are held at the peak
    (module doc). Raises ValueError for a non-positive micro-batch count."""
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
    M, L = num_microbatches, num_local_layers
    if pp == 1:
        return L
    schedule = PipelineSchedule(schedule)
    if schedule is PipelineSchedule.one_f_one_b:
        return min(pp - pp_rank, M) * L
    v = schedule.stages_per_rank
    chunk = L / v
    if schedule is PipelineSchedule.interleaved_1f1b:
        return min((pp - pp_rank - 1) * 2 + (v - 1) * pp + 1, v * M) * chunk
    return min(2 * pp, v * M) * chunk  # zbv


@dataclass(frozen=True)
class ActivationEstimate:
    """Modelled activation bytes of one rank at its peak.

    per_microbatch: one micro-batch through all of this rank's layers (and head), as saved for backward.
    in_flight_layer_passes: see ``in_flight_layer_passes`` (layer-passes held at the peak).
    peak: the activations held at the peak, including one layer recomputed under checkpointing and
        the head of one micro-batch on the last stage.
    tokens_per_microbatch: local tokens of one micro-batch (B * S / cp).
    """

    per_microbatch: float
    in_flight_layer_passes: float
    peak: float
    tokens_per_microbatch: float


def activation_estimate(run_cfg: RunConfig, shard: RankShard, *, k_e: float, view: PlanView) -> ActivationEstimate:
    """Activation memory of ``shard``'s rank for ``run_cfg``'s micro-batch, sequence, recompute policy
    and pipeline schedule (module doc)."""
    cfg, dims = run_cfg.model, shard.dims
    bytes_per = 2 if run_cfg.train.bf16 else 4
    tokens = run_cfg.data.micro_batch_size * run_cfg.data.seq_length / view.cp
    layer = layer_activation_elements_per_token(cfg, tp=dims.tp, k_e=k_e) * tokens * bytes_per
    fused = LMHeadCE(run_cfg.loss.lm_head_ce) is LMHeadCE.fused
    head = 0.0
    if shard.last_stage:
        head = head_activation_bytes_per_token(cfg, tp=dims.tp, bytes_per=bytes_per, fused=fused) * tokens
        if fused:
            head += fused_head_fixed_bytes(cfg, tp=dims.tp, tokens=tokens, device_type=str(run_cfg.train.device),
                                           mtp_loss=run_cfg.loss.mtp_weight > 0)
    L = len(shard.local_layers)
    passes = in_flight_layer_passes(schedule=run_cfg.parallel.pp_schedule, pp=dims.pp, pp_rank=shard.pp_rank,
                                    num_microbatches=view.num_microbatches, num_local_layers=L)
    if view.cp > 1:  # the gathered latent of the whole sequence, per MLA block
        gathered = 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * tokens * view.cp * bytes_per
        layer += gathered
    if run_cfg.train.activation_checkpointing:
        kept = cfg.hidden_size * tokens * bytes_per
        peak = passes * kept + layer + head
    else:
        peak = passes * layer + head
    return ActivationEstimate(per_microbatch=L * layer + head, in_flight_layer_passes=passes, peak=peak,
                              tokens_per_microbatch=tokens)
