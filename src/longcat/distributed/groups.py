"""Process groups built once from a ``ParallelDims`` and passed down; no globals.

Two ``DeviceMesh`` objects cover the same ranks (see ``parallel_dims`` for the rank order):

- dense mesh ``("pp", "dp", "cp", "tp")``: attention, dense FFNs, embeddings; grads reduce over dp x cp
  (``dp_cp_group``: each cp rank saw S/cp tokens of the same sequences).
- expert mesh ``("pp", "edp", "ep")``: routed experts; grads reduce over edp (which spans cp and tp).

``rank_layout`` computes, without any process group, each rank's coordinates and the members of its
groups; ``ProcessGroups.build`` checks the meshes against it, and ``tools/plan_layout.py`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longcat.distributed.parallel_dims import ParallelDims

__all__ = ["ProcessGroups", "RankLayout", "rank_layout"]


@dataclass(frozen=True)
class RankLayout:
    """Where one global rank sits, and the global ranks of each of its groups (sorted, itself included).

    ``*_ranks`` tuples are ordered by group rank, so ``tp_ranks[tp_rank] == rank``.
    """

    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    edp_rank: int
    ep_rank: int
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]
    cp_rank: int = 0
    cp_ranks: tuple[int, ...] = ()
    dp_cp_ranks: tuple[int, ...] = ()  # dp-major: (dp 0: cp 0..), (dp 1: cp 0..), ...

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in ``dp_cp_ranks``: ``dp_rank * cp + cp_rank``."""
        return self.dp_cp_ranks.index(self.rank)


def rank_layout(dims: ParallelDims, rank: int) -> RankLayout:
    """Coordinates and group members of global ``rank`` under ``dims``; needs no process group.

    Dense: ``rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``. Expert (inside the stage):
    ``rank = pp_rank * dp * cp * tp + edp_rank * ep + ep_rank``.

    Raises:
        ValueError: rank outside ``[0, world_size)``.
    """
    if not 0 <= rank < dims.world_size:
        raise ValueError(
            f"rank={rank} is outside [0, world_size={dims.world_size}): pick a rank below {dims.world_size}"
        )
    stage_size = dims.stage_size
    pp_rank, in_stage = divmod(rank, stage_size)
    dp_cp_rank, tp_rank = divmod(in_stage, dims.tp)
    dp_rank, cp_rank = divmod(dp_cp_rank, dims.cp)
    edp_rank, ep_rank = divmod(in_stage, dims.ep)
    stage_base = pp_rank * stage_size

    def dense(d: int, c: int, t: int) -> int:
        return stage_base + (d * dims.cp + c) * dims.tp + t

    return RankLayout(
        rank=rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
        tp_rank=tp_rank,
        edp_rank=edp_rank,
        ep_rank=ep_rank,
        tp_ranks=tuple(dense(dp_rank, cp_rank, t) for t in range(dims.tp)),
        dp_ranks=tuple(dense(d, cp_rank, tp_rank) for d in range(dims.dp)),
        pp_ranks=tuple(p * stage_size + in_stage for p in range(dims.pp)),
        ep_ranks=tuple(stage_base + edp_rank * dims.ep + e for e in range(dims.ep)),
        edp_ranks=tuple(stage_base + d * dims.ep + ep_rank for d in range(dims.edp)),
        cp_rank=cp_rank,
        cp_ranks=tuple(dense(dp_rank, c, tp_rank) for c in range(dims.cp)),
        dp_cp_ranks=tuple(dense(d, c, tp_rank) for d in range(dims.dp) for c in range(dims.cp)),
    )


def _local_group() -> dist.ProcessGroup:
    """A real size-1 gloo ``ProcessGroup`` that needs no ``init_process_group``.

    Collectives on it are no-ops, so code written against groups runs unchanged in one process.
    The gloo backend also serves CUDA tensors for the ops gloo implements on CUDA (all_reduce,
    broadcast, all_gather); this package's collectives short-circuit size-1 groups before any call.
    (``ProcessGroup._register_backend`` is private but stable since torch 2.0; this is its only use.)
    """
    store = dist.HashStore()
    group = dist.ProcessGroup(store, 0, 1)
    backend = dist.ProcessGroupGloo(store, 0, 1)  # type: ignore[call-arg]  # stub omits timeout's default (30 min)
    for device_type in ("cpu", "cuda"):
        group._register_backend(torch.device(device_type), dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    return group


@dataclass(frozen=True)
class ProcessGroups:
    """All process groups of one job; build once in the entry point and pass down.

    Each layer receives the narrowest group it needs (``tp_group``, ``ep_group``); never use
    ``None``/WORLD implicitly. ``world_group`` is for job-wide scalars (loss, grad norm pieces).

    Attributes:
        dims: the degrees the groups were built from.
        layout: this rank's coordinates and group members (``rank_layout(dims, rank)``).
        dense_mesh: ``DeviceMesh`` with dims ``("pp", "dp", "cp", "tp")``; None from ``single()``.
        expert_mesh: ``DeviceMesh`` with dims ``("pp", "edp", "ep")``; None from ``single()``.
        world_group, tp_group, dp_group, pp_group, ep_group, edp_group, cp_group: the process groups.
        dp_cp_group: dp x cp together (the ``dp_group`` itself when cp = 1): the ranks whose tokens make
            up one step of a model replica, over which dense gradients, token counts and router
            statistics are summed.
    """

    dims: ParallelDims
    layout: RankLayout
    dense_mesh: Optional[DeviceMesh]
    expert_mesh: Optional[DeviceMesh]
    world_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup

    @classmethod
    def build(cls, dims: ParallelDims, *, device_type: Optional[str] = None) -> ProcessGroups:
        """Build both meshes over the initialised default process group. Collective: call on every rank.

        The one place outside the entry point that takes hold of the default group (as
        ``world_group``): everything else receives the groups built here, never the default group
        implicitly (tests/unit/test_no_default_group.py).

        Args:
            dims: validated degrees; ``dims.world_size`` must equal the process group's size.
            device_type: ``"cpu"`` or ``"cuda"``; default ``"cuda"`` for an NCCL default group,
                else ``"cpu"``.

        Raises:
            ValueError: the default process group is not initialised, or its size differs from
                ``dims.world_size``.
        """
        if not dist.is_initialized():
            raise ValueError(
                "ProcessGroups.build needs torch.distributed initialised (launch with torchrun and call "
                "init_process_group first), or use ProcessGroups.single() for one process"
            )
        world_group = dist.group.WORLD  # the default group, created by init_process_group
        assert world_group is not None  # torch.distributed is initialised (checked above)
        world_size = dist.get_world_size(world_group)
        if world_size != dims.world_size:
            raise ValueError(
                f"the process group has world_size={world_size} but ParallelDims has "
                f"world_size={dims.world_size}: build ParallelDims from dist.get_world_size()"
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend(world_group) == "nccl" else "cpu"
        # Both meshes enumerate ranks in row-major order of their shapes, which is exactly the
        # Megatron order of parallel_dims (tp / ep fastest); new_group calls are collective.
        dense_mesh = init_device_mesh(device_type, dims.dense_mesh_shape, mesh_dim_names=("pp", "dp", "cp", "tp"))
        expert_mesh = init_device_mesh(device_type, dims.expert_mesh_shape, mesh_dim_names=("pp", "edp", "ep"))
        if dims.cp == 1:
            dp_cp_group = dense_mesh.get_group("dp")
        elif dims.dp == 1:
            dp_cp_group = dense_mesh.get_group("cp")
        else:  # a collective over the world, like the meshes
            dp_cp_group = dense_mesh["dp", "cp"]._flatten("dp_cp").get_group()
        groups = cls(
            dims=dims,
            layout=rank_layout(dims, dist.get_rank(world_group)),
            dense_mesh=dense_mesh,
            expert_mesh=expert_mesh,
            world_group=world_group,
            tp_group=dense_mesh.get_group("tp"),
            dp_group=dense_mesh.get_group("dp"),
            pp_group=dense_mesh.get_group("pp"),
            ep_group=expert_mesh.get_group("ep"),
            edp_group=expert_mesh.get_group("edp"),
            cp_group=dense_mesh.get_group("cp"),
            dp_cp_group=dp_cp_group,
        )
        groups._check_against_layout()
        return groups

    @classmethod
    def single(cls) -> ProcessGroups:
        """One process, every degree 1: size-1 groups, no ``init_process_group``, no meshes."""
        dims = ParallelDims(1)
        group = _local_group()
        return cls(
            dims=dims,
            layout=rank_layout(dims, 0),
            dense_mesh=None,
            expert_mesh=None,
            world_group=group,
            tp_group=group,
            dp_group=group,
            pp_group=group,
            ep_group=group,
            edp_group=group,
            cp_group=group,
            dp_cp_group=group,
        )

    def _check_against_layout(self) -> None:
        for name in ("tp", "dp", "pp", "ep", "edp", "cp", "dp_cp"):
            actual = tuple(dist.get_process_group_ranks(getattr(self, f"{name}_group")))
            expected = getattr(self.layout, f"{name}_ranks")
            assert actual == expected, f"{name} group {actual} != rank_layout {expected} for rank {self.rank}"

    @property
    def rank(self) -> int:
        """Global rank."""
        return self.layout.rank

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank

    @property
    def pp_rank(self) -> int:
        return self.layout.pp_rank

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank

    @property
    def edp_rank(self) -> int:
        return self.layout.edp_rank

    @property
    def cp_rank(self) -> int:
        return self.layout.cp_rank

    @property
    def cp_size(self) -> int:
        return self.dims.cp

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def ep_size(self) -> int:
        return self.dims.ep

    @property
    def edp_size(self) -> int:
        return self.dims.edp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1
