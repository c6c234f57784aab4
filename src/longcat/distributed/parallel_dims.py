"""Parallel degrees as plain validated data (no process groups here).

Rank order (Megatron): the dense grid is ``pp x dp x tp`` with tp fastest-varying and pp outermost,
so ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``. Experts use "MoE parallel folding"
(Megatron-core, ``moe/README``): inside one pipeline stage the ``dp * tp`` ranks are re-factored as
``edp x ep`` with ep fastest, so ``rank = pp_rank * dp * tp + edp_rank * ep + ep_rank``. Expert
weights are sharded over ep (by global expert id) and replicated over edp; dense weights are sharded
over tp and replicated over dp.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Optional

__all__ = ["ParallelDims"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    """Validated parallel degrees of one job; ``dp=-1`` is inferred as ``world_size // (pp * tp)``.

    Validation runs on construction, so a ``ParallelDims`` that exists is consistent.

    Raises:
        ValueError: a degree < 1 (dp may be -1); ``world_size != pp * dp * tp``; ``world_size`` not
            divisible by ``pp * tp`` when dp is inferred; ``ep`` not dividing ``dp * tp`` (the ranks
            of one pipeline stage, which the expert layout re-factors as ``edp x ep``).
    """

    world_size: int
    _: KW_ONLY
    tp: int = 1
    pp: int = 1
    dp: int = -1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.dp == -1:
            if self.world_size % (self.pp * self.tp) != 0:
                raise ValueError(
                    f"world_size={self.world_size} is not divisible by pp*tp={self.pp * self.tp} "
                    f"(pp={self.pp}, tp={self.tp}), so dp cannot be inferred: choose pp and tp whose "
                    f"product divides {self.world_size}"
                )
            object.__setattr__(self, "dp", self.world_size // (self.pp * self.tp))
        elif not isinstance(self.dp, int) or self.dp < 1:
            raise ValueError(f"dp={self.dp!r} must be an integer >= 1, or -1 to infer it from world_size")
        self.validate()

    def validate(self) -> None:
        """Check the degree products; called on construction. Raises ValueError (see class doc)."""
        product = self.pp * self.dp * self.tp
        if product != self.world_size:
            hint = (
                f"set dp={self.world_size // (self.pp * self.tp)} or dp=-1 to infer it"
                if self.world_size % (self.pp * self.tp) == 0
                else f"choose pp and tp whose product divides {self.world_size}, and dp=-1"
            )
            raise ValueError(
                f"world_size={self.world_size} != pp*dp*tp = {self.pp}*{self.dp}*{self.tp} = {product}: {hint}"
            )
        if self.stage_size % self.ep != 0:
            raise ValueError(
                f"ep={self.ep} must divide dp*tp={self.stage_size} (dp={self.dp}, tp={self.tp}: the ranks of "
                f"one pipeline stage, re-factored as edp x ep): choose ep in {_divisors(self.stage_size)}"
            )

    def check_model(
        self,
        *,
        num_attention_heads: int,
        n_routed_experts: int,
        num_layers: int,
        num_stages: Optional[int] = None,
    ) -> None:
        """Check that a model's dimensions split evenly over this layout.

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
        stages = self.pp if num_stages is None else num_stages
        if num_attention_heads % self.tp != 0:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} is not divisible by tp={self.tp}: "
                f"choose tp in {_divisors(num_attention_heads)}"
            )
        if n_routed_experts % self.ep != 0:
            raise ValueError(
                f"n_routed_experts={n_routed_experts} is not divisible by ep={self.ep}: choose ep in "
                f"{[d for d in _divisors(n_routed_experts) if self.stage_size % d == 0]} "
                f"(divisors of the experts that also divide dp*tp={self.stage_size})"
            )
        if stages < 1 or stages % self.pp != 0:
            raise ValueError(
                f"num_stages={stages} must be a positive multiple of pp={self.pp} "
                "(each pipeline rank holds the same number of stages)"
            )
        if num_layers % stages != 0:
            stage_counts = [d for d in _divisors(num_layers) if d % self.pp == 0]
            fix = f"set num_stages to one of {stage_counts}, or " if stage_counts else ""
            raise ValueError(
                f"num_layers={num_layers} is not divisible by the {stages} pipeline stages (pp={self.pp}): "
                f"{fix}change num_layers to a multiple of {stages}, or choose pp in {_divisors(num_layers)}"
            )

    @classmethod
    def from_config(cls, parallel: Any, *, world_size: int) -> "ParallelDims":
        """Build from any object with ``tp, pp, dp, ep`` attributes (e.g. ``config.ParallelConfig``)."""
        return cls(world_size, tp=parallel.tp, pp=parallel.pp, dp=parallel.dp, ep=parallel.ep)

    @property
    def stage_size(self) -> int:
        """Ranks in one pipeline stage: ``dp * tp`` (= ``edp * ep``)."""
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        """Expert data parallelism: replicas of each expert shard, ``dp * tp // ep``."""
        return self.stage_size // self.ep

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
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def edp_enabled(self) -> bool:
        return self.edp > 1

    @property
    def dense_mesh_shape(self) -> tuple[int, int, int]:
        """Shape of the dense mesh, dims ``("pp", "dp", "tp")``."""
        return (self.pp, self.dp, self.tp)

    @property
    def expert_mesh_shape(self) -> tuple[int, int, int]:
        """Shape of the expert mesh, dims ``("pp", "edp", "ep")``."""
        return (self.pp, self.edp, self.ep)

    def __str__(self) -> str:
        return (
            f"ParallelDims(world_size={self.world_size}, pp={self.pp}, dp={self.dp}, tp={self.tp}, "
            f"ep={self.ep}, edp={self.edp})"
        )
