"""The non-finite guard: every rank takes the same action when any rank sees a NaN/Inf.

A NaN or Inf in one rank's loss, or in the global grad norm, must not reach the weights. Each rank
contributes a flag (its local loss, the norm) to one all-reduce (max) over the world group, so all
ranks decide alike even when only one rank's loss is NaN (its peers' losses are finite, and under
PP a stage may hold no loss at all):

- ``train.nonfinite_policy=skip``: no clipping, no optimizer step, no LR-schedule step, no expert-bias
  update (the step's router counts are discarded); the data position still advances. Counted in the
  ``nonfinite/skipped_steps`` metric.
- ``abort``: every rank raises ``NonFiniteError`` (``launch`` turns it into exit code 4); nothing is
  saved from the poisoned state.

Checkpoints never hold a non-finite tensor: ``assert_finite_state`` runs inside
``CheckpointManager.save`` before anything is written and refuses, on every rank, naming the tensor.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from longcat.config.schema import NonFinitePolicy

logger = logging.getLogger(__name__)

NONFINITE_EXIT_CODE = 4


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or grad norm under ``train.nonfinite_policy=abort`` (raised on every rank)."""

    exit_code = NONFINITE_EXIT_CODE


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint was refused because some rank holds a non-finite tensor (raised on every rank)."""

    exit_code = NONFINITE_EXIT_CODE


def _world_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else group.size()


class NonFiniteGuard:
    """Decides, identically on every rank, whether this step's update is applied.

    Args:
        policy: ``skip`` or ``abort``.
        world_group: the group spanning every rank (``None`` or size 1: no communication).
    """

    def __init__(self, policy: NonFinitePolicy, *, world_group: Optional[dist.ProcessGroup]):
        self.policy = NonFinitePolicy(policy)
        self.world_group = world_group
        self.num_skipped = 0
        self.skipped_last = False  # whether the latest checked step was skipped

    def should_skip(self, grad_norm: float, *, loss: float, step: int, skippable: bool = True) -> bool:
        """True when this step must not be applied (collective over the world group: every rank calls).

        Args:
            grad_norm: the global grad norm (identical on every rank).
            loss: this rank's loss (its dp share; 0 where a pipeline stage holds none).
            step: the 1-based number of the step being computed (for the messages).
            skippable: False when the update already happened (DeepSpeed steps before the norm is
                known): a non-finite step then aborts whatever the policy.

        Raises:
            NonFiniteError: a non-finite value under ``abort`` (or not ``skippable``), on every rank.
        """
        flags = torch.tensor([float(not math.isfinite(loss)), float(not math.isfinite(grad_norm))],
                             dtype=torch.float64)
        if _world_size(self.world_group) > 1:
            # [2] {0, 1} per rank -> all_reduce(max, world) -> [2] "some rank saw it"
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.world_group)
        self.skipped_last = False
        if not flags.any():
            return False
        what = " and ".join(name for name, bad in zip(("loss", "grad norm"), flags.tolist()) if bad)
        message = (f"non-finite {what} at step {step} (this rank: loss {loss}, grad norm {grad_norm})")
        if self.policy is NonFinitePolicy.abort or not skippable:
            reason = "" if skippable else " (dp_mode=deepspeed applies the update before the norm is known)"
            raise NonFiniteError(f"{message}; train.nonfinite_policy={self.policy.value}{reason}: stopping")
        self.num_skipped += 1
        self.skipped_last = True
        logger.warning("%s: step skipped (parameters, optimizer, LR schedule and expert bias untouched; "
                       "%d skipped so far)", message, self.num_skipped)
        return True


def checkpoint_tensors(target: Any, optimizer: Optional[torch.optim.Optimizer]) -> Iterator[tuple[str, torch.Tensor]]:
    """What a checkpoint of ``target`` (a ``checkpoint.CheckpointTarget``) and ``optimizer`` would hold
    of this rank, by name: parameters and persistent buffers (``model.<name>``) and optimizer state
    (``optim.state.<name>.<key>``; under DeepSpeed by the partition's index)."""
    for name, param, _ in target.params:
        yield f"model.{name}", param
    for name, buf in target.buffers:
        yield f"model.{name}", buf
    if optimizer is None:
        return
    names = {id(param): name for name, param, _ in target.params}
    for i, (param, state) in enumerate(optimizer.state.items()):
        for key, value in state.items():
            if torch.is_tensor(value):
                yield f"optim.state.{names.get(id(param), f'[{i}]')}.{key}", value


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or Inf (local shards of DTensors)."""
    bad = []
    for name, t in named:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def assert_finite_state(named: Iterable[tuple[str, torch.Tensor]], *,
                        group: Optional[dist.ProcessGroup] = None) -> None:
    """Refuse to save if any rank holds a non-finite tensor among ``named`` (e.g. ``checkpoint_tensors``).

    Collective over ``group`` (``None``: one process): every rank calls, and all raise together, so
    none enters the checkpoint write alone.

    Raises:
        NonFiniteCheckpointError: naming the tensors and the ranks that hold them.
    """
    bad = nonfinite_tensors(named)
    world = _world_size(group)
    if world > 1:
        flag = torch.tensor([float(bool(bad))])
        # [1] {0, 1} per rank -> all_reduce(max) -> [1]
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() == 0:
            return
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, bad, group=group)
        found = {rank: names for rank, names in enumerate(per_rank) if names}
    elif not bad:
        return
    else:
        found = {0: bad}
    listing = "; ".join(f"rank {rank}: {', '.join(names[:8])}" + (f" (+{len(names) - 8} more)" if names[8:] else "")
                        for rank, names in found.items())
    raise NonFiniteCheckpointError(f"refusing to write a checkpoint holding non-finite tensors ({listing})")
