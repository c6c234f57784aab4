"""Parallel degrees as plain validated data (no process groups here).

Rank order (Megatron): the dense grid is ``pp x dp x cp x tp`` with tp fastest-varying and pp
outermost, so ``rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``. Experts use "MoE
parallel folding" (Megatron-core, ``moe/README``): inside one pipeline stage the ``dp * cp * tp`` ranks
are re-factored as ``edp x ep`` with ep fastest, so ``rank = pp_rank * stage_size + edp_rank * ep +
ep_rank``. Expert weights are sharded over ep (by global expert id) and replicated over edp; dense
weights are sharded over tp and replicated over dp and cp (each cp rank holds S/cp tokens of every
sequence: context parallelism). LongCat-Flash's layout (arXiv 2509.01322 §5.3) is EP=32 folding CP=8
x DP=4 inside a stage: ``ParallelDims(world, pp=..., cp=8, ep=32)``.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Optional

from longcat.config.layout import check_model_split, resolve_dp

__all__ = ["ParallelDims"]


@dataclass(frozen=True)
class ParallelDims:
    """Validated parallel degrees of one job; ``dp=-1`` is inferred as ``world_size // (pp * cp * tp)``.

    Validation runs on construction, so a ``ParallelDims`` that exists is consistent. The rules are the
    config layer's (``longcat.config.layout``): the run's configuration was checked by the same ones.

    Raises:
        ValueError: a degree < 1 (dp may be -1); ``world_size != pp * dp * cp * tp``; ``world_size``
            not divisible by ``pp * cp * tp`` when dp is inferred; ``ep`` not dividing ``dp * cp * tp``
            (the ranks of one pipeline stage, which the expert layout re-factors as ``edp x ep``).
    """

    world_size: int
    _: KW_ONLY
    tp: int = 1
    pp: int = 1
    dp: int = -1
    ep: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dp", resolve_dp(self.world_size, tp=self.tp, pp=self.pp, dp=self.dp, ep=self.ep,
                                                  cp=self.cp))

    def validate(self) -> None:
        """Check the degree products again (``config.layout.resolve_dp``, as construction does). Raises
        ValueError (see class doc)."""
        resolve_dp(self.world_size, tp=self.tp, pp=self.pp, dp=self.dp, ep=self.ep, cp=self.cp)

    def check_model(
        self,
        *,
        num_attention_heads: int,
        n_routed_experts: int,
        num_layers: int,
        num_stages: Optional[int] = None,
    ) -> None:
        """Check that a model's dimensions split evenly over this layout (``config.layout.check_model_split``).

        Args:
            num_attention_heads: attention heads, sharded over tp.
            n_routed_experts: FFN (routed) experts, sharded over ep; zero-computation experts do
                not count (they are never sharded or sent).
            num_layers: decoder layers, split evenly over pipeline stages.
            num_stages: pipeline stages in total (pp times the virtual stages per rank for
                interleaved schedules); defaults to pp.

        Raises:
            ValueError: heads % tp, experts % ep, num_stages % pp or num_layers % num_stages is
                non-zero; the message lists valid choices.
        """
        check_model_split(tp=self.tp, pp=self.pp, ep=self.ep, stage_size=self.stage_size,
                          num_attention_heads=num_attention_heads, n_routed_experts=n_routed_experts,
                          num_layers=num_layers, num_stages=num_stages)

    @classmethod
    def from_config(cls, parallel: Any, *, world_size: int) -> ParallelDims:
        """Build from any object with ``tp, pp, dp, ep`` (and optionally ``cp``) attributes (e.g.
        ``config.ParallelConfig``)."""
        return cls(world_size, tp=parallel.tp, pp=parallel.pp, dp=parallel.dp, ep=parallel.ep,
                   cp=getattr(parallel, "cp", 1))

    @property
    def stage_size(self) -> int:
        """Ranks in one pipeline stage: ``dp * cp * tp`` (= ``edp * ep``)."""
        return self.dp * self.cp * self.tp

    @property
    def edp(self) -> int:
        """Expert data parallelism: replicas of each expert shard, ``dp * cp * tp // ep``."""
        return self.stage_size // self.ep

    @property
    def dp_cp(self) -> int:
        """Ranks of one model replica's data: ``dp * cp`` (dense gradients and token counts sum over them)."""
        return self.dp * self.cp

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def edp_enabled(self) -> bool:
        return self.edp > 1

    @property
    def dense_mesh_shape(self) -> tuple[int, int, int, int]:
        """Shape of the dense mesh, dims ``("pp", "dp", "cp", "tp")``."""
        return (self.pp, self.dp, self.cp, self.tp)

    @property
    def expert_mesh_shape(self) -> tuple[int, int, int]:
        """Shape of the expert mesh, dims ``("pp", "edp", "ep")``."""
        return (self.pp, self.edp, self.ep)

    def __str__(self) -> str:
        return (
            f"ParallelDims(world_size={self.world_size}, pp={self.pp}, dp={self.dp}, cp={self.cp}, tp={self.tp}, "
            f"ep={self.ep}, edp={self.edp})"
        )
