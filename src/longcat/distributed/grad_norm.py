"""The global gradient norm for clipping: every parameter counted exactly once over all groups.

A rank holds, for each parameter, a *local* gradient: the whole tensor, or one shard of it (TP, EP,
FSDP), on its own pipeline stage. Copies of the same local gradient live on other ranks (dense
params replicated over dp and cp and, when not TP-sharded, over tp; experts replicated over edp; a tied
embedding on the first and the last stage). The squared norm of the global gradient is therefore

    ||g||^2 = sum over (param, distinct shard) of ||local shard||^2

which each rank computes by adding a parameter's local squares only if it is the *owner* of that
copy: coordinate 0 in every group the copy is replicated over. One all-reduce (sum, world) of a
float64 scalar then gives the same bits on every rank (a reduction result is broadcast, not
recomputed per rank). Shards (tp, ep, fsdp-dp, pp stages) are simply summed by that all-reduce.

Reference: Megatron-LM ``clip_grads.get_grad_norm_fp32`` (norms of non-duplicated params, summed over
the model-parallel group); torchtitan ``dist_utils.clip_grad_norm_`` (DTensor norms, summed over pp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["GradShard", "clip_grads_", "global_grad_norm"]

GROUP_NAMES = ("pp", "dp", "cp", "tp", "edp", "ep")


@dataclass(frozen=True)
class GradShard:
    """One parameter as seen by the grad norm.

    Attributes:
        param: the parameter (its ``.grad`` may be a DTensor: only the local shard is read).
        replicated_over: names of the groups (``GROUP_NAMES``) over which an identical copy of this
            local gradient lives; the copy is counted only where every such coordinate is 0.
    """

    param: torch.Tensor
    replicated_over: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.replicated_over) - set(GROUP_NAMES)
        assert not unknown, f"unknown groups {unknown}"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _is_owner(replicated_over: Sequence[str], coords: Mapping[str, int]) -> bool:
    return all(coords[name] == 0 for name in replicated_over)


def global_grad_norm(shards: Iterable[GradShard], *, coords: Mapping[str, int],
                     world_group: Optional[dist.ProcessGroup]) -> float:
    """L2 norm of the whole model's gradient, identical on every rank.

    Args:
        shards: every parameter of this rank (those without a gradient are skipped).
        coords: this rank's coordinate in each group of ``GROUP_NAMES`` (``ProcessGroups.layout``).
        world_group: the group spanning all ranks (``None`` or size 1: no communication).

    Returns:
        The norm in fp64 precision as a Python float (``inf``/``nan`` if a gradient is non-finite).
    """
    shards = list(shards)
    device = shards[0].param.device if shards else torch.device("cpu")
    owned = [_local(s.param.grad) for s in shards
             if s.param.grad is not None and _is_owner(s.replicated_over, coords)]
    owned = [g for g in owned if g.numel()]
    sq = torch.zeros((), dtype=torch.float64, device=device)
    if owned:
        # Per-tensor fp32 norms (foreach), squared and summed in fp64: the order is fixed by `shards`.
        norms = torch._foreach_norm(owned, 2.0)
        sq = torch.stack([n.double() for n in norms]).square().sum().to(device)
    if world_group is not None and world_group.size() > 1:
        # [] float64 sum of owned squares -> all_reduce(sum, world) -> [] ||g||^2
        dist.all_reduce(sq, group=world_group)
    return math.sqrt(float(sq))


@torch.no_grad()
def clip_grads_(params: Iterable[torch.Tensor], *, total_norm: float, max_norm: float) -> float:
    """Scale every local gradient by ``min(1, max_norm / (total_norm + 1e-6))`` (as
    ``torch.nn.utils.clip_grad_norm_``); ``max_norm <= 0`` disables clipping. Returns the factor."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    coef = max_norm / (total_norm + 1e-6)
    if coef >= 1.0:
        return 1.0
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef)
    return coef
