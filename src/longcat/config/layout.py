"""Parallel-degree arithmetic: the pure checks of a layout, with no process group and no torch.

The config validation (``longcat.config.validate``) and the runtime ``distributed.ParallelDims`` both
call these, so a layout is judged by one set of rules whether it comes from a recipe at compose time or
from a test building process groups. Messages use the config's names (``parallel.tp``, ``model.*``).

Rank grid (Megatron): the dense ranks form ``pp x dp x cp x tp`` (tp fastest); inside one pipeline stage
the ``dp x cp x tp`` ranks are re-factored as ``edp x ep`` for the experts, so ep must divide
``dp * cp * tp`` (LongCat-Flash's EP=32 folds CP=8 x DP=4: arXiv 2509.01322 §5.3).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["check_model_split", "divisors", "resolve_dp"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_dp(world_size: int, *, tp: int, pp: int, dp: int, ep: int, cp: int = 1) -> int:
    """The data-parallel degree of this layout (``dp=-1``: inferred as ``world_size // (pp * cp * tp)``).

    Raises:
        ValueError: a degree < 1 (dp may be -1); ``world_size != pp * dp * cp * tp``; ``world_size`` not
            divisible by ``pp * cp * tp`` when dp is inferred; ``ep`` not dividing ``dp * cp * tp`` (the
            ranks of one pipeline stage). The message names the numbers and the valid choices.
    """
    for name, value in (("world_size", world_size), ("parallel.tp", tp), ("parallel.pp", pp), ("parallel.ep", ep),
                        ("parallel.cp", cp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    model_ranks = pp * cp * tp
    names = f"pp*cp*tp={model_ranks} (parallel.pp={pp}, parallel.cp={cp}, parallel.tp={tp})" if cp > 1 \
        else f"pp*tp={model_ranks} (parallel.pp={pp}, parallel.tp={tp})"
    choose = "choose pp, cp and tp" if cp > 1 else "choose pp and tp"
    if cp > world_size:
        raise ValueError(f"parallel.cp={cp} is larger than the world size {world_size}: choose cp in "
                         f"{divisors(world_size)}")
    if dp == -1:
        if world_size % model_ranks != 0:
            raise ValueError(
                f"world_size={world_size} is not divisible by {names}, so dp cannot be inferred: "
                f"{choose} whose product divides {world_size}"
            )
        dp = world_size // model_ranks
    elif isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ValueError(f"parallel.dp={dp!r} must be an integer >= 1, or -1 to infer it from world_size")
    product = model_ranks * dp
    if product != world_size:
        hint = (f"set parallel.dp={world_size // model_ranks} or parallel.dp=-1 to infer it"
                if world_size % model_ranks == 0 else f"{choose} whose product divides {world_size}, and dp=-1")
        factors = f"pp*dp*cp*tp = {pp}*{dp}*{cp}*{tp}" if cp > 1 else f"pp*dp*tp = {pp}*{dp}*{tp}"
        raise ValueError(f"world_size={world_size} != {factors} = {product}: {hint}")
    stage_size = dp * cp * tp
    if stage_size % ep != 0:
        ranks = (f"dp*cp*tp={stage_size} (dp={dp}, cp={cp}, tp={tp}" if cp > 1
                 else f"dp*tp={stage_size} (dp={dp}, tp={tp}")
        raise ValueError(
            f"parallel.ep={ep} must divide {ranks}: the ranks of one pipeline stage, "
            f"re-factored as edp x ep): choose ep in {divisors(stage_size)}"
        )
    return dp


def check_model_split(*, tp: int, pp: int, ep: int, stage_size: int, num_attention_heads: int, n_routed_experts: int,
                      num_layers: int, num_stages: Optional[int] = None) -> None:
    """Check that a model's dimensions split evenly over a layout whose degrees are already valid.

    Args:
        tp, pp, ep: the degrees; ``stage_size``: ``dp * cp * tp``, the ranks of one pipeline stage.
        num_attention_heads: attention heads, sharded over tp.
        n_routed_experts: FFN (routed) experts, sharded over ep; zero-computation experts do not count
            (they are never sharded or sent).
        num_layers: decoder layers, split evenly over pipeline stages.
        num_stages: pipeline stages in total (pp times the virtual stages per rank of interleaved
            schedules); defaults to pp.

    Raises:
        ValueError: heads % tp, experts % ep, num_stages % pp or num_layers % num_stages is non-zero;
            the message lists valid choices.
    """
    stages = pp if num_stages is None else num_stages
    if num_attention_heads % tp != 0:
        raise ValueError(f"model.num_attention_heads={num_attention_heads} is not divisible by parallel.tp={tp}: "
                         f"choose tp in {divisors(num_attention_heads)}")
    if n_routed_experts % ep != 0:
        raise ValueError(
            f"model.n_routed_experts={n_routed_experts} is not divisible by parallel.ep={ep}: choose ep in "
            f"{[d for d in divisors(n_routed_experts) if stage_size % d == 0]} "
            f"(divisors of the experts that also divide the {stage_size} ranks of a pipeline stage)"
        )
    if stages < 1 or stages % pp != 0:
        raise ValueError(f"num_stages={stages} must be a positive multiple of parallel.pp={pp} "
                         "(each pipeline rank holds the same number of stages)")
    if num_layers % stages != 0:
        raise ValueError(_layers_over_stages_problem(num_layers=num_layers, pp=pp, stages=stages))


def _layers_over_stages_problem(*, num_layers: int, pp: int, stages: int) -> str:
    """The message for ``num_layers % stages != 0``, with the config keys that fix it: the layer count,
    one stage per rank (``parallel.pp_schedule=1f1b``) where the schedule has more, or another pp."""
    per_rank = stages // pp
    if per_rank == 1:
        fixes = [f"set model.num_layers to a multiple of {pp}"]
    else:
        fixes = [f"set model.num_layers to a multiple of {stages} ({per_rank} stages per rank x pp={pp})"]
        if num_layers % pp == 0:
            fixes.append("parallel.pp_schedule=1f1b (one stage per rank)")
    other_pps = [p for p in divisors(num_layers) if p > 1 and p != pp and num_layers % (p * per_rank) == 0]
    if other_pps:
        fixes.append(f"parallel.pp in {other_pps}")
    return (f"model.num_layers={num_layers} is not divisible by the {stages} pipeline stages (parallel.pp={pp}"
            f"{f' x {per_rank} per rank' if per_rank > 1 else ''}): " + ", or ".join(fixes))
