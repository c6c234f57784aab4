"""The memory model: exact state bytes, activation constants against what autograd saves, the
micro-batches in flight per pipeline schedule."""

from __future__ import annotations

import pytest
import torch

from longcat.config.compose import compose_run_config
from longcat.config.schema import DPMode, PipelineSchedule
from longcat.distributed.linear_cross_entropy import (
    grads_in_forward,
    lm_head_cross_entropy_sum,
)
from longcat.model import LongcatFlashForCausalLM, init_weights
from longcat.planning import build_rank_shard
from longcat.planning.memory import (
    fused_head_chunk_bytes,
    fused_head_fixed_bytes,
    head_activation_bytes_per_token,
    in_flight_layer_passes,
    layer_activation_elements_per_token,
    state_bytes,
)


def test_state_bytes_are_fp32_weights_grads_and_two_adam_moments_plus_steps():
    cfg, _ = compose_run_config("pretrain", ["model=tiny"])
    shard = build_rank_shard(cfg, world_size=1, rank=0)
    state = state_bytes(shard)
    n = shard.params.total
    assert state.weights == state.grads == 4 * n
    assert state.optimizer == 8 * n + 4 * shard.num_param_tensors
    assert state.master == 0


def _saved_bytes(overrides: list[str]) -> tuple[int, float]:
    """Bytes autograd saves in one forward of [8, 128] tokens (parameters excluded), and the k_e routed."""
    torch.manual_seed(0)
    cfg, _ = compose_run_config("pretrain", overrides)
    model = LongcatFlashForCausalLM(cfg.model)
    init_weights(model, cfg.model, width_scale=1.0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randint(0, cfg.model.vocab_size, (8, 128)))
    n = cfg.model.n_routed_experts
    k_e = sum(float(s.expert_counts_E[:n].sum() / s.num_tokens) for s in out.moe_stats) / len(out.moe_stats)
    return sum(saved.values()), k_e


def test_layer_activation_constants_match_what_autograd_saves():
    """Per layer (the difference between 4 and 2 layers of the small preset), within 15%."""
    four, k_e = _saved_bytes(["model=small", "model.num_layers=4"])
    two, _ = _saved_bytes(["model=small", "model.num_layers=2"])
    cfg, _ = compose_run_config("pretrain", ["model=small"])
    measured = (four - two) / 2
    modelled = layer_activation_elements_per_token(cfg.model, tp=1, k_e=k_e) * 8 * 128 * 4
    assert modelled == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("schedule, pp, pp_rank, expected", [
    ("1f1b", 4, 0, 4 * 7), ("1f1b", 4, 3, 1 * 7),
    ("interleaved_1f1b", 4, 0, (6 + 4 + 1) * 3.5), ("interleaved_1f1b", 4, 3, (0 + 4 + 1) * 3.5),
    ("zbv", 4, 0, 8 * 3.5), ("zbv", 4, 3, 8 * 3.5),
])
def test_in_flight_layer_passes(schedule, pp, pp_rank, expected):
    passes = in_flight_layer_passes(schedule=PipelineSchedule(schedule), pp=pp, pp_rank=pp_rank,
                                    num_microbatches=16, num_local_layers=7)
    assert passes == expected


def test_in_flight_is_capped_by_the_micro_batches_and_one_without_pp():
    assert in_flight_layer_passes(schedule=PipelineSchedule("1f1b"), pp=8, pp_rank=0, num_microbatches=2,
                                  num_local_layers=3) == 6
    assert in_flight_layer_passes(schedule=PipelineSchedule("1f1b"), pp=1, pp_rank=0, num_microbatches=64,
                                  num_local_layers=5) == 5
    with pytest.raises(ValueError, match="num_microbatches"):
        in_flight_layer_passes(schedule=PipelineSchedule("zbv"), pp=2, pp_rank=0, num_microbatches=0,
                               num_local_layers=2)


def test_deepspeed_partitions_the_optimizer_and_zero2_the_grads():
    cfg, _ = compose_run_config("pretrain", ["model=tiny", "parallel.dp_mode=deepspeed"])
    shard = build_rank_shard(cfg, world_size=2, rank=0)
    n = shard.params.total
    z2 = state_bytes(shard, dp_mode=DPMode.deepspeed, zero_stage=2)
    z1 = state_bytes(shard, dp_mode=DPMode.deepspeed, zero_stage=1)
    assert z2.weights == 4 * n and z2.grads == 4 * n // 2 and z2.optimizer == 8 * n // 2 and z2.master == 4 * n // 2
    assert z1.grads == 4 * n


@pytest.mark.parametrize("tokens", [8 * 128, 256])  # >= D: gradients formed in forward; < D: recomputed
def test_fused_head_saves_what_the_memory_model_counts(tokens):
    """What the fused head + CE keeps for backward: per token D values (the input's gradient, or the
    input itself for the recompute) and an fp32 log-sum-exp (recompute only), and, with the gradients
    formed in forward, the fp32 weight gradient [V, D] (``fused_head_fixed_bytes`` less its transient
    chunk); a chunk's logits on the CPU are 8 MiB, at most the micro-batch's."""
    cfg, _ = compose_run_config("pretrain", ["model=small"])
    D, V = cfg.model.hidden_size, cfg.model.vocab_size
    head = torch.nn.Linear(D, V, bias=False)
    params = {head.weight.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.is_floating_point():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_head_cross_entropy_sum(head, torch.randn(1, tokens, D, requires_grad=True),
                                  torch.randint(0, V, (1, tokens)))
    in_forward = grads_in_forward(tokens, D)
    per_token = head_activation_bytes_per_token(cfg.model, tp=1, bytes_per=4, fused=True) - 2 * D * 4  # less the norm
    if in_forward:
        per_token -= 4  # the log-sum-exp is kept only for the recompute
    fixed = fused_head_fixed_bytes(cfg.model, tp=1, tokens=tokens) - fused_head_chunk_bytes(cfg.model, tp=1,
                                                                                          tokens=tokens)
    assert sum(saved.values()) == per_token * tokens + fixed
    assert (fixed > 0) == in_forward == (tokens >= D)
    assert fused_head_chunk_bytes(cfg.model, tp=1, tokens=tokens) == 2 * min(256, tokens) * V * 4
