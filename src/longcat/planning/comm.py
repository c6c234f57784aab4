"""Communication of one rank in one optimizer step, by group (bytes this rank sends).

Ring-algorithm volumes (what NCCL's ring moves per rank, and the convention of bandwidth tests):
all-reduce ``2 (n-1)/n x size``, all-gather and reduce-scatter ``(n-1)/n x size`` of the full
(gathered) tensor, all-to-all ``(n-1)/n`` of the local buffer (the part that stays is not sent).
``b`` is the activation element width (2 under ``train.bf16``, else 4); gradients and parameters
travel in fp32 (the trainer's dtype). ``T = B * S / cp`` local tokens of a micro-batch, ``M``
micro-batches per step on this rank, ``L`` its decoder layers.

- EP (``ep`` group): per MoE layer and micro-batch the tokens' FFN-expert slots go out (dispatch)
  and come back (combine): ``k_e T/tp`` slots of ``D`` values each way, ``(ep-1)/ep`` of them leave
  the rank; zero-expert slots never travel (§2.1, the dispatcher's invariant). Backward repeats both,
  and activation checkpointing's recomputed forward repeats them again: ``(4 or 6) x k_e T/tp D b``.
- TP (``tp`` group): the MLA blocks and FFNs end in a row-parallel output, 4 per layer (2 MLA,
  2 FFN), each an all-reduce of ``[T, D]`` in forward and one in backward (with SP the same volume
  as a reduce-scatter + all-gather pair); the MoE's input gather and output split, 1 each way.
- CP (``cp`` group): every MLA block all-gathers the compressed KV latent (``C + R`` values per
  token) in forward and reduce-scatters its gradient in backward.
- DP (``dp`` group; ``dp x cp`` once CP exists) and EDP (``edp``): replicate sums the fp32 grads
  once per step (an all-reduce of the dense / expert shard); FSDP all-gathers the fp32 weights in
  forward and again in backward and reduce-scatters the grads (per micro-batch: FSDP2 reshards after
  each forward).
- PP (``pp`` group): every stage boundary sends ``[B, S/cp, D]`` (activation dtype) forward and its
  gradient back, per micro-batch and per stage this rank holds that is not the pipeline's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longcat.config.schema import PipelineSchedule, RunConfig
from longcat.planning.memory import FP32, PlanView
from longcat.planning.shard import RankShard

__all__ = ["GroupTraffic", "StepTraffic", "step_traffic"]


@dataclass(frozen=True)
class GroupTraffic:
    """Bytes this rank sends per step in one group, and the group's size. ``overlappable``: the part
    that can hide under computation (ScMoE overlap for EP; FSDP's prefetch; PP sends)."""

    group: str
    size: int
    bytes: float
    overlappable: float = 0.0


@dataclass(frozen=True)
class StepTraffic:
    """Per-group traffic of one rank in one step (``groups``: ep, tp, cp, dp, edp, pp)."""

    groups: list[GroupTraffic] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(g.bytes for g in self.groups)

    def by_group(self) -> dict[str, GroupTraffic]:
        return {g.group: g for g in self.groups}


def _frac(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def step_traffic(run_cfg: RunConfig, shard: RankShard, *, k_e: float, view: PlanView) -> StepTraffic:
    """Bytes per group this rank sends in one optimizer step (module doc)."""
    cfg, dims, par = run_cfg.model, shard.dims, run_cfg.parallel
    cp = view.cp
    b = 2 if run_cfg.train.bf16 else 4
    D = cfg.hidden_size
    T = run_cfg.data.micro_batch_size * run_cfg.data.seq_length / cp
    M, L = view.num_microbatches, len(shard.local_layers)
    recompute = run_cfg.train.activation_checkpointing
    out: list[GroupTraffic] = []

    passes = 6 if recompute else 4
    ep_bytes = passes * k_e * T / dims.tp * D * b * _frac(dims.ep) * L * M
    out.append(GroupTraffic("ep", dims.ep, ep_bytes, ep_bytes if par.overlap_moe_comm else 0.0))

    fwd = 3 if recompute else 2  # forward, backward (+ recomputed forward)
    tp_bytes = (4 * 2 + 2) * _frac(dims.tp) * T * D * b * fwd * L * M
    out.append(GroupTraffic("tp", dims.tp, tp_bytes))

    mla_blocks = 2 * L + (cfg.mtp_num_layers if shard.last_stage else 0)
    cp_bytes = 2 * _frac(cp) * T * cp * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b * mla_blocks * M
    out.append(GroupTraffic("cp", cp, cp_bytes))

    dense = shard.params.total - shard.params.experts
    experts = shard.params.experts
    dp_n, edp_n = view.dense_grad_group, dims.edp
    if shard.sharded_over_dp:  # local counts are shards: the full units are n times larger
        dp_bytes = 3 * _frac(dp_n) * dense * dp_n * FP32 * M
        edp_bytes = 3 * _frac(edp_n) * experts * edp_n * FP32 * M
        out.append(GroupTraffic("dp", dp_n, dp_bytes, dp_bytes * 2 / 3))
        out.append(GroupTraffic("edp", edp_n, edp_bytes, edp_bytes * 2 / 3))
    else:
        out.append(GroupTraffic("dp", dp_n, 2 * _frac(dp_n) * dense * FP32))
        out.append(GroupTraffic("edp", edp_n, 2 * _frac(edp_n) * experts * FP32))

    stages = PipelineSchedule(par.pp_schedule).stages_per_rank if dims.pp > 1 else 1
    boundaries = stages - (1 if shard.first_stage else 0) - (1 if shard.last_stage else 0) + stages
    pp_bytes = boundaries * T * D * b * M if dims.pp > 1 else 0.0
    out.append(GroupTraffic("pp", dims.pp, pp_bytes, pp_bytes))
    return StepTraffic(out)
