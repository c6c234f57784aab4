"""The dry run: one rank of a production layout, built for real on the meta device, and its plan.

``dry_run(run_cfg, world_size=N, rank=R, device=...)`` validates the configuration for N ranks (the
same ``longcat.config.validate`` a training run calls), builds rank R's shards with the real
``parallelize`` (``planning.shard``), and models its memory (``planning.memory``), communication
(``planning.comm``) and step time (``planning.timing``). ``sweep`` does it for several candidate
layouts of one world size and ranks those that fit by modelled step time.

Assumptions where arXiv 2509.01322 is silent are the code's own: fp32 weights and AdamW state (bf16
is autocast), the DP modes of ``parallel.dp_mode``, the schedules of ``parallel.pp_schedule``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from longcat.config.layout import divisors
from longcat.config.schema import DPMode, PipelineSchedule, RunConfig
from longcat.config.validate import ConfigError, validate
from longcat.model.flops import step_flops
from longcat.model.params import count_parameters
from longcat.planning.comm import StepTraffic, step_traffic
from longcat.planning.memory import (
    ADAM_MOMENTS,
    FP32,
    ActivationEstimate,
    PlanView,
    StateBytes,
    activation_estimate,
    cp_degree,
    state_bytes,
)
from longcat.planning.shard import RankShard, build_rank_shard
from longcat.planning.timing import GIB, DeviceSpec, StepTime, modelled_step_time

__all__ = [
    "DryRunReport", "LayoutError", "ModelTotals", "SweepRow", "candidate_layouts", "distributed_optimizer_bytes",
    "dry_run", "model_totals", "plan_view", "sweep",
]


class LayoutError(ValueError):
    """A layout that cannot run: ``errors`` holds one message per problem, each with the numbers."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class ModelTotals:
    """The whole model (§2): ``total`` parameters; activated parameters per token at ``k_e`` FFN experts
    (``active_expected``), at 0 (``active_min``) and at ``moe_topk`` (``active_max``)."""

    total: int
    active_expected: float
    active_min: int
    active_max: int
    k_e: float


@dataclass
class DryRunReport:
    """Everything the dry run finds for one rank of one layout (see ``tools/dry_run.py --help``).

    Byte figures are bytes; ``peak_bytes`` = state + activations + the device's reserve + ``gathered_bytes``
    (FSDP under PP: the fp32 units of this rank's stages, gathered for the whole step).
    ``problems`` is empty when the layout fits the device.
    """

    world_size: int
    layout: dict[str, Any]
    shard: RankShard
    model: ModelTotals
    state: StateBytes
    activations: ActivationEstimate
    traffic: StepTraffic
    step_model_flops: float
    device: Optional[DeviceSpec]
    time: Optional[StepTime]
    peak_bytes: float
    view: PlanView
    cp_assumed: bool = False
    gathered_bytes: float = 0.0
    distributed_optimizer_bytes: float = 0.0
    fsdp_peak_bytes: Optional[float] = None  # the same rank's dry run under parallel.dp_mode=fsdp (see dry_run)
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain numbers; bytes in bytes, times in seconds)."""
        s = self.shard
        return {
            "world_size": self.world_size,
            "layout": self.layout,
            "rank": {"rank": s.rank, "pp_rank": s.pp_rank, "tp_rank": s.tp_rank, "ep_rank": s.ep_rank,
                     "local_layers": list(s.local_layers), "first_stage": s.first_stage,
                     "last_stage": s.last_stage, "num_microbatches": s.num_microbatches},
            "model": dataclasses.asdict(self.model),
            "params": {**dataclasses.asdict(s.params), "total": s.params.total,
                       "num_tensors": s.num_param_tensors},
            "bytes": {**dataclasses.asdict(self.state), "state_total": self.state.total,
                      "activations_per_microbatch": self.activations.per_microbatch,
                      "activations_peak": self.activations.peak,
                      "in_flight_layer_passes": self.activations.in_flight_layer_passes,
                      "reserved": (self.device.reserved_gib * GIB) if self.device else 0.0,
                      "gathered_units": self.gathered_bytes,
                      "peak": self.peak_bytes,
                      "optimizer_if_distributed": self.distributed_optimizer_bytes,
                      "peak_if_fsdp": self.fsdp_peak_bytes},
            "cp": {"degree": self.view.cp, "assumed": self.cp_assumed,
                   "dense_grad_group": self.view.dense_grad_group},
            "comm_bytes_per_step": {g.group: {"size": g.size, "bytes": g.bytes, "overlappable": g.overlappable}
                                    for g in self.traffic.groups},
            "model_flops_per_step": self.step_model_flops,
            "device": dataclasses.asdict(self.device) if self.device else None,
            "time": dataclasses.asdict(self.time) if self.time else None,
            "fits": self.fits,
            "problems": list(self.problems),
        }


def model_totals(run_cfg: RunConfig) -> ModelTotals:
    """Total and activated parameters of ``run_cfg.model`` at ``moe.expected_ffn_experts`` (§2)."""
    counts = count_parameters(run_cfg.model)
    k_e = run_cfg.moe.expected_ffn_experts
    return ModelTotals(total=counts.total, active_expected=counts.active_at(k_e), active_min=counts.active_min,
                       active_max=counts.active_max, k_e=k_e)


def _layout(run_cfg: RunConfig, shard: RankShard, view: PlanView) -> dict[str, Any]:
    d, p = shard.dims, run_cfg.parallel
    return {"pp": d.pp, "dp": view.dense_grad_group // view.cp, "tp": d.tp, "cp": view.cp, "ep": d.ep, "edp": d.edp,
            "dp_mode": str(p.dp_mode), "pp_schedule": str(p.pp_schedule) if d.pp > 1 else None,
            "sequence_parallel": bool(p.sequence_parallel), "activation_checkpointing":
            bool(run_cfg.train.activation_checkpointing), "bf16": bool(run_cfg.train.bf16),
            "micro_batch_size": run_cfg.data.micro_batch_size, "seq_length": run_cfg.data.seq_length,
            "global_batch_size": run_cfg.data.global_batch_size}


def plan_view(run_cfg: RunConfig, shard: RankShard, *, assume_cp: Optional[int] = None) -> tuple[PlanView, bool]:
    """The CP degree and what follows from it; ``assume_cp``: plan with CP while the configuration has
    no ``parallel.cp`` (the built layout's dp ranks then fold cp: dp = replicas x cp; parameters are
    replicated over cp, so the shards are the same). Returns the view and whether cp was assumed.

    Raises:
        LayoutError: ``assume_cp`` that contradicts ``parallel.cp``, does not divide dp, the global
            batch or the sequence (2 cp chunks).
    """
    dims, data = shard.dims, run_cfg.data
    configured = cp_degree(run_cfg)
    if assume_cp is None or assume_cp == 1 or (configured > 1 and assume_cp == configured):
        return PlanView(cp=configured, dense_grad_group=dims.dp * configured,
                        num_microbatches=shard.num_microbatches), False
    if configured > 1:
        raise LayoutError([f"--assume-cp {assume_cp} contradicts parallel.cp={configured}; drop --assume-cp"])
    errors = []
    if dims.dp % assume_cp:
        errors.append(f"--assume-cp {assume_cp} must divide dp={dims.dp} (the ranks of a stage that fold cp)")
    if data.seq_length % (2 * assume_cp):
        errors.append(f"--assume-cp {assume_cp}: data.seq_length={data.seq_length} must divide by 2 x cp = "
                      f"{2 * assume_cp} (the load-balanced causal split)")
    replicas = max(1, dims.dp // assume_cp)
    if data.global_batch_size % (data.micro_batch_size * replicas):
        errors.append(f"--assume-cp {assume_cp}: data.global_batch_size={data.global_batch_size} must be a "
                      f"multiple of micro_batch_size x dp/cp = {data.micro_batch_size * replicas}")
    if errors:
        raise LayoutError(errors)
    return PlanView(cp=assume_cp, dense_grad_group=dims.dp,
                    num_microbatches=data.global_batch_size // (data.micro_batch_size * replicas)), True


def distributed_optimizer_bytes(shard: RankShard, view: PlanView) -> float:
    """AdamW's moments if they were sharded over the gradient groups (ZeRO-1: dense over dp x cp,
    experts over edp), for comparison with what the configured DP mode holds."""
    if shard.sharded_over_dp:
        return float(ADAM_MOMENTS * FP32 * shard.params.total)
    dense = shard.params.total - shard.params.experts
    return ADAM_MOMENTS * FP32 * (dense / view.dense_grad_group + shard.params.experts / shard.dims.edp)


def dry_run(run_cfg: RunConfig, *, world_size: int, rank: int = 0, device: Optional[DeviceSpec] = None,
            memory_limit_gib: Optional[float] = None, assume_cp: Optional[int] = None,
            suggest_fsdp: bool = True) -> DryRunReport:
    """Build rank ``rank`` of ``run_cfg`` on ``world_size`` ranks and model its step.

    Args:
        run_cfg: the composed run configuration (the same overrides as a training run).
        world_size, rank: the job's size and the rank to build.
        device: the accelerator (timing, HBM check); None skips both.
        memory_limit_gib: a budget below the HBM to check against (e.g. the paper's 60 GB).
        assume_cp: plan with this CP degree while the configuration has no ``parallel.cp`` (``plan_view``).
        suggest_fsdp: when the layout does not fit under another DP mode (and dp x cp or edp > 1), also
            dry-run the same rank under ``parallel.dp_mode=fsdp`` and say in a ``why:`` problem what it
            would peak at.

    Returns:
        The report; ``problems`` lists why the layout does not fit (peak above HBM or the limit).

    Raises:
        LayoutError: the configuration is invalid for ``world_size`` (a degree that does not divide,
            a stage without layers, ...), with every problem.
    """
    try:
        validate(run_cfg, world_size=world_size)
    except ConfigError as exc:
        raise LayoutError(exc.errors) from None
    if not 0 <= rank < world_size:
        raise LayoutError([f"--rank {rank} is outside [0, world_size={world_size})"])
    shard = build_rank_shard(run_cfg, world_size=world_size, rank=rank)
    view, cp_assumed = plan_view(run_cfg, shard, assume_cp=assume_cp)
    k_e = run_cfg.moe.expected_ffn_experts
    state = state_bytes(shard, dp_mode=DPMode(run_cfg.parallel.dp_mode), zero_stage=run_cfg.parallel.zero_stage)
    acts = activation_estimate(run_cfg, shard, k_e=k_e, view=view)
    traffic = step_traffic(run_cfg, shard, k_e=k_e, view=view)
    flops = step_flops(run_cfg.model, batch_size=run_cfg.data.global_batch_size, seq_len=run_cfg.data.seq_length,
                       ffn_experts_per_token=k_e)
    reserved = device.reserved_gib * GIB if device else 0.0
    # FSDP under PP keeps every unit of this rank's stages gathered for the step (fp32 weights)
    gathered = FP32 * max(0, shard.gathered_params - (shard.params.total - shard.whole_params)) \
        if shard.sharded_over_dp and shard.dims.pp > 1 else 0
    peak = state.total + acts.peak + reserved + gathered
    timing = None
    problems: list[str] = []
    if device is not None:
        dense_fraction = (flops.dense_matmul_flops + flops.attention_flops) / flops.total_flops
        timing = modelled_step_time(run_cfg, traffic=traffic, step_model_flops=flops.total_flops,
                                    dense_flops_fraction=dense_fraction, world_size=world_size, tp=shard.dims.tp,
                                    pp=shard.dims.pp, num_microbatches=view.num_microbatches, device=device)
        problems += _memory_problems(peak, limit_gib=device.hbm_gib, what=f"{device.name} HBM", state=state,
                                     acts=acts, reserved=reserved, gathered=gathered)
    if memory_limit_gib is not None:
        problems += _memory_problems(peak, limit_gib=memory_limit_gib, what="--memory-limit-gib", state=state,
                                     acts=acts, reserved=reserved, gathered=gathered)
    fsdp = None
    shardable = view.dense_grad_group > 1 or shard.dims.edp > 1  # FSDP would split something
    if problems and suggest_fsdp and shardable and DPMode(run_cfg.parallel.dp_mode) is not DPMode.fsdp:
        fsdp, why = _fsdp_alternative(run_cfg, world_size=world_size, rank=rank, device=device,
                                      memory_limit_gib=memory_limit_gib, assume_cp=assume_cp, state=state)
        problems.append(why)
    return DryRunReport(world_size=world_size, layout=_layout(run_cfg, shard, view), shard=shard,
                        model=model_totals(run_cfg), state=state, activations=acts, traffic=traffic,
                        step_model_flops=flops.total_flops, device=device, time=timing, peak_bytes=peak, view=view,
                        cp_assumed=cp_assumed, gathered_bytes=gathered,
                        distributed_optimizer_bytes=distributed_optimizer_bytes(shard, view),
                        fsdp_peak_bytes=fsdp.peak_bytes if fsdp else None, problems=problems)


def _fsdp_alternative(run_cfg: RunConfig, *, world_size: int, rank: int, device: Optional[DeviceSpec],
                      memory_limit_gib: Optional[float], assume_cp: Optional[int],
                      state: StateBytes) -> tuple[Optional[DryRunReport], str]:
    """The same rank dry-run under ``parallel.dp_mode=fsdp`` (None where validation refuses it), and the
    ``why:`` line that quotes it: its peak is the FSDP plan's own, with the stage's gathered units."""
    mode = run_cfg.parallel.dp_mode
    why = f"why: parallel.dp_mode={mode} holds {state.total / GIB:.1f} GiB of model state on this rank"
    cfg = dataclasses.replace(run_cfg, parallel=dataclasses.replace(run_cfg.parallel, dp_mode=DPMode.fsdp))
    try:
        fsdp = dry_run(cfg, world_size=world_size, rank=rank, device=device, memory_limit_gib=memory_limit_gib,
                       assume_cp=assume_cp, suggest_fsdp=False)
    except LayoutError as exc:
        return None, f"{why}; parallel.dp_mode=fsdp, which shards it, is refused here: {exc.errors[0]}"
    s, view = fsdp.state, fsdp.view
    verdict = "fits" if fsdp.fits else "does not fit either"
    return fsdp, (f"{why}; the dry run of parallel.dp_mode=fsdp (dense shards over dp x cp = "
                  f"{view.dense_grad_group}, experts over edp {fsdp.shard.dims.edp}) peaks at "
                  f"{fsdp.peak_bytes / GIB:.1f} GiB: weights {s.weights / GIB:.1f} + grads {s.grads / GIB:.1f} + "
                  f"optimizer {s.optimizer / GIB:.1f} + gathered units {fsdp.gathered_bytes / GIB:.1f} + activations "
                  f"{fsdp.activations.peak / GIB:.1f} + reserved {(device.reserved_gib if device else 0.0):.1f} "
                  f"GiB ({verdict})")


def _memory_problems(peak: float, *, limit_gib: float, what: str, state: StateBytes, acts: ActivationEstimate,
                     reserved: float, gathered: float) -> list[str]:
    if peak <= limit_gib * GIB:
        return []
    units = f" + gathered units {_gib(gathered)}" if gathered else ""
    return [f"peak memory {_gib(peak)} GiB exceeds {what} {_gib(limit_gib * GIB)} GiB by "
            f"{_gib(peak - limit_gib * GIB)} GiB: weights {_gib(state.weights)} + grads "
            f"{_gib(state.grads)} + optimizer {_gib(state.optimizer)}{units} + activations "
            f"{_gib(acts.peak)} ({acts.in_flight_layer_passes:g} layer-passes in flight) + reserved "
            f"{_gib(reserved)} GiB"]


def _gib(num_bytes: float) -> str:
    """GiB with one decimal from 1 GiB up, else two significant digits (a 0.01 GiB budget is not 0.0)."""
    value = num_bytes / GIB
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2g}"


# ------------------------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class SweepRow:
    """One candidate layout: its overrides, and the worst of its checked ranks (None when invalid)."""

    overrides: dict[str, Any]
    report: Optional[DryRunReport]
    error: str = ""


def candidate_layouts(run_cfg: RunConfig, *, world_size: int) -> list[dict[str, Any]]:
    """A few layouts of ``world_size`` ranks for ``run_cfg.model`` around the configured one: the configured
    layout itself first (pp, tp, ep, schedule, sequence parallelism and DP mode as given, valid or not:
    an invalid one shows with its reason); pp over the divisors of the layer count (tp = 1 with PP), tp
    1/2/4/8 without PP, ep at half, once and twice the configured degree (with ep = 1: also 4, 8 and 16,
    ep being the point of an MoE sweep); the configured cp; sequence parallelism with tp > 1 only where
    cp is 1 (cp already splits the sequence; validation refuses both); the configured schedule, falling
    back to 1F1B where it does not split the layers; each layout with ``dp_mode=replicate`` and, where
    ``validate`` accepts them, ``fsdp`` and the configured DP mode."""
    cfg, parallel, cp = run_cfg.model, run_cfg.parallel, run_cfg.parallel.cp
    centres = {parallel.ep} | ({min(8, cfg.n_routed_experts)} if parallel.ep == 1 else set())
    eps = sorted({e for c in centres for e in (c // 2, c, c * 2) if e >= 1 and cfg.n_routed_experts % e == 0}
                 | {parallel.ep})
    configured = {"pp": parallel.pp, "tp": parallel.tp, "ep": parallel.ep, "dp": -1,
                  "pp_schedule": str(PipelineSchedule(parallel.pp_schedule)),
                  "sequence_parallel": bool(parallel.sequence_parallel), "dp_mode": str(DPMode(parallel.dp_mode))}
    out = [configured]
    for pp in [p for p in divisors(cfg.num_layers) if world_size % p == 0]:
        for tp in ([1, 2, 4, 8] if pp == 1 else [1]):
            if world_size % (pp * tp) or cfg.num_attention_heads % tp:
                continue
            for ep in eps:
                if (world_size // pp) % ep:
                    continue
                schedule = PipelineSchedule(run_cfg.parallel.pp_schedule)
                if pp > 1 and cfg.num_layers % (pp * schedule.stages_per_rank):
                    schedule = PipelineSchedule.one_f_one_b
                layout = {"pp": pp, "tp": tp, "ep": ep, "dp": -1, "pp_schedule": str(schedule),
                          "sequence_parallel": tp > 1 and cp == 1}
                out += [{**layout, "dp_mode": str(mode)}
                        for mode in _dp_modes(run_cfg, layout=layout, world_size=world_size)
                        if {**layout, "dp_mode": str(mode)} != configured]
    return out


def _dp_modes(run_cfg: RunConfig, *, layout: dict[str, Any], world_size: int) -> list[DPMode]:
    """``replicate`` (refused by no check, so an invalid layout still shows once, with its reason), then
    ``fsdp`` and the configured mode where ``validate`` accepts them for ``layout``."""
    modes = [DPMode.replicate]
    for mode in (DPMode.fsdp, DPMode(run_cfg.parallel.dp_mode)):
        if mode in modes:
            continue
        parallel = dataclasses.replace(run_cfg.parallel, **layout, dp_mode=mode)
        try:
            validate(dataclasses.replace(run_cfg, parallel=parallel), world_size=world_size)
        except ConfigError:
            continue
        modes.append(mode)
    return modes


def sweep(run_cfg: RunConfig, *, world_size: int, device: DeviceSpec, memory_limit_gib: Optional[float] = None,
          layouts: Optional[list[dict[str, Any]]] = None, assume_cp: Optional[int] = None) -> list[SweepRow]:
    """Dry-run each candidate layout (``candidate_layouts`` unless given) at its first rank of the first
    and of the last pipeline stage (the ends of the pipeline hold the embedding, the head and the most
    micro-batches in flight) and keep the worse by peak memory. Rows that fit come first, fastest
    modelled step first; then those that do not fit; then invalid ones. (No ``why:`` re-run under FSDP:
    the FSDP candidates are rows of their own.)"""
    candidates = layouts if layouts is not None else candidate_layouts(run_cfg, world_size=world_size)
    if not candidates:
        raise LayoutError([f"no candidate layouts for world size {world_size}: the list of layouts to try is "
                           "empty; give at least one"])
    rows = []
    for overrides in candidates:
        cfg = dataclasses.replace(run_cfg, parallel=dataclasses.replace(run_cfg.parallel, **overrides))
        try:
            stage_size = world_size // (overrides["pp"])
            ranks = sorted({0, (overrides["pp"] - 1) * stage_size})
            reports = [dry_run(cfg, world_size=world_size, rank=r, device=device, memory_limit_gib=memory_limit_gib,
                               assume_cp=assume_cp, suggest_fsdp=False) for r in ranks]
        except LayoutError as exc:
            rows.append(SweepRow(overrides, None, exc.errors[0]))
            continue
        rows.append(SweepRow(overrides, max(reports, key=lambda r: r.peak_bytes)))

    def key(row: SweepRow) -> tuple[int, float]:
        if row.report is None:
            return (2, 0.0)
        step = row.report.time.step_s if row.report.time else 0.0
        return (0 if row.report.fits else 1, step)

    return sorted(rows, key=key)
