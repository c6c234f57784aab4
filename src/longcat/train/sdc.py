"""Silent-data-corruption (SDC) detection by deterministic replay and cross-replica checksums.

PAPER.md §5.1: because every kernel is deterministic, recomputing the same work must give the same
bits; a difference means the hardware corrupted something. Two checks:

- replay: every ``sdc.replay_interval`` steps the trainer re-runs one micro-batch's forward and
  backward with the same parameters and compares the checksums of its loss and of every gradient it
  produced with those of the first computation, bit for bit;
- cross-replica: every ``sdc.replica_interval`` steps, after the optimizer step, the parameters that
  dp (dense) or edp (experts) replicas hold in common must hash identically on every replica.

Checksums are exact integer reductions over the tensors' bit patterns: a position-weighted sum of
the 32-bit words in int64 (wrapping). Integer addition is associative, so the checksum does not
depend on the reduction order or the device, and any single flipped bit changes it.

``FaultInjector`` flips one chosen bit on purpose so tests can prove every injected fault is found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from longcat.config.schema import FaultInjection, FaultTarget

logger = logging.getLogger(__name__)

# Odd multipliers so that a flipped bit in word i changes the sum by (2^b * w_i) mod 2^64 != 0.
# Kept below 2^31 so a word times a weight fits in int64; the sum itself wraps modulo 2^64.
_WEIGHTS = torch.tensor([0x1E3779B1, 0x05EBCA77, 0x42B2AE3D, 0x27D4EB2F, 0x165667B1, 0x53A2646D,
                         0x7D7046C5, 0x355A4F09], dtype=torch.int64)


def tensor_checksum(tensor: torch.Tensor) -> int:
    """An exact, order-independent checksum of ``tensor``'s bits (any dtype, any device).

    Returns a Python int; equal tensors (bitwise) give equal checksums, a single flipped bit never
    leaves it unchanged.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    weights = _WEIGHTS.to(words.device).repeat((words.numel() + len(_WEIGHTS) - 1) // len(_WEIGHTS))
    positions = torch.arange(words.numel(), device=words.device, dtype=torch.int64)
    mixed = words * weights[: words.numel()] + positions * 0x632BE5AB
    return int(mixed.sum().item()) ^ (flat.numel() << 1)


def checksums(named: Iterable[tuple[str, Optional[torch.Tensor]]]) -> dict[str, int]:
    """Checksums of every named tensor that is not None."""
    return {name: tensor_checksum(t) for name, t in named if t is not None}


@dataclass(frozen=True)
class Mismatch:
    """One tensor whose recomputation did not reproduce its bits."""

    step: int
    rank: int
    tensor: str
    first: Optional[int]
    second: Optional[int]
    check: str  # "replay" or "replica"

    def __str__(self) -> str:
        return (f"SDC suspected ({self.check} check) at step {self.step} on rank {self.rank}: tensor "
                f"{self.tensor!r} checksum {self.first} != {self.second}")


def compare_checksums(first: dict[str, int], second: dict[str, int], *, step: int, rank: int,
                      check: str = "replay") -> list[Mismatch]:
    """Every tensor whose checksum differs (or that exists in only one of the two), in name order."""
    return [Mismatch(step=step, rank=rank, tensor=name, first=first.get(name), second=second.get(name), check=check)
            for name in sorted(set(first) | set(second)) if first.get(name) != second.get(name)]


def cross_replica_mismatches(named_params: Iterable[tuple[str, torch.Tensor]], *, group: Optional[dist.ProcessGroup],
                             step: int) -> list[Mismatch]:
    """Compare parameter checksums across the replicas of ``group`` (all ranks of it must call).

    Each rank all-gathers the [P] int64 checksum vector over ``group``; a parameter whose checksum
    differs from the group's first rank is reported on every rank, naming the deviating rank.
    """
    if group is None or dist.get_world_size(group) == 1:
        return []
    named = list(named_params)
    local_P = torch.tensor([tensor_checksum(p) for _, p in named], dtype=torch.int64)
    gathered = [torch.empty_like(local_P) for _ in range(dist.get_world_size(group))]
    # [P] int64 -> all_gather(group) -> world x [P]
    dist.all_gather(gathered, local_P, group=group)
    ranks = dist.get_process_group_ranks(group)
    found = []
    for member, sums_P in zip(ranks[1:], gathered[1:]):
        for i in torch.nonzero(sums_P != gathered[0]).flatten().tolist():
            found.append(Mismatch(step=step, rank=member, tensor=named[i][0], first=int(gathered[0][i]),
                                  second=int(sums_P[i]), check="replica"))
    return found


def flip_bit_(tensor: torch.Tensor, *, index: int, bit: int) -> None:
    """Flip bit ``bit`` of element ``index`` (modulo numel) of ``tensor`` in place (fp32/bf16/int)."""
    with torch.no_grad():
        flat = tensor.view(-1)
        i = index % flat.numel()
        if flat.element_size() == 4:
            words = flat.view(torch.int32)
            words[i] ^= (1 << (bit % 32)) if bit % 32 != 31 else -(1 << 31)
        elif flat.element_size() == 2:
            words = flat.view(torch.int16)
            words[i] ^= (1 << (bit % 16)) if bit % 16 != 15 else -(1 << 15)
        else:
            words = flat.view(torch.int64)
            words[i] ^= 1 << (bit % 63)


class FaultInjector:
    """Injects the configured single-bit fault once, on one rank, at one step.

    The trainer calls ``maybe_activation_hooks`` before the first forward of a step, ``after_backward``
    after the first backward of the replayed micro-batch and ``after_optimizer`` after the optimizer
    step. Replays never receive the fault (it models a transient hardware error).
    """

    def __init__(self, cfg: FaultInjection, *, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.injected_at: Optional[int] = None

    def _armed(self, step: int, target: FaultTarget) -> bool:
        return (self.cfg.step == step and self.rank == self.cfg.rank and self.injected_at is None
                and FaultTarget(self.cfg.target) is target)

    def activation_hook(self, model: torch.nn.Module, *, step: int):
        """A forward hook handle on module ``cfg.tensor`` that flips a bit of its output once, or None."""
        if not self._armed(step, FaultTarget.activation):
            return None
        modules = dict(model.named_modules())
        if self.cfg.tensor not in modules:
            raise ValueError(f"sdc.inject.tensor={self.cfg.tensor!r} is not a module name of the model; "
                             f"e.g. {sorted(modules)[1:6]}")

        def hook(_module, _inputs, output):
            if self.injected_at is None:
                target = output[0] if isinstance(output, tuple) else output
                flip_bit_(target, index=self.cfg.index, bit=self.cfg.bit)
                self.injected_at = step
                logger.warning("injected fault: activation %s bit %d at step %d", self.cfg.tensor, self.cfg.bit, step)
            return output

        return modules[self.cfg.tensor].register_forward_hook(hook)

    def _flip_param(self, model: torch.nn.Module, *, step: int, grad: bool) -> None:
        params = dict(model.named_parameters())
        if self.cfg.tensor not in params:
            raise ValueError(f"sdc.inject.tensor={self.cfg.tensor!r} is not a parameter name; "
                             f"e.g. {sorted(params)[:5]}")
        target = params[self.cfg.tensor].grad if grad else params[self.cfg.tensor].data
        if target is None:
            raise ValueError(f"sdc.inject: parameter {self.cfg.tensor!r} has no gradient at step {step}")
        flip_bit_(target, index=self.cfg.index, bit=self.cfg.bit)
        self.injected_at = step
        logger.warning("injected fault: %s of %s bit %d at step %d", "gradient" if grad else "parameter",
                       self.cfg.tensor, self.cfg.bit, step)

    def after_backward(self, model: torch.nn.Module, *, step: int) -> None:
        if self._armed(step, FaultTarget.gradient):
            self._flip_param(model, step=step, grad=True)

    def after_optimizer(self, model: torch.nn.Module, *, step: int) -> None:
        if self._armed(step, FaultTarget.parameter):
            self._flip_param(model, step=step, grad=False)
