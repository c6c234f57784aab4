"""Silent-data-corruption (SDC) detection by deterministic replay and cross-replica checksums.

arXiv 2509.01322 §5.1: because every kernel is deterministic, recomputing the same work must give the same
bits; a difference means the hardware corrupted something. Two checks:

- replay: every ``sdc.replay_interval`` steps the trainer re-runs one micro-batch's forward and
  backward with the same parameters and compares the checksums of its loss and of every gradient it
  produced with those of the first computation, bit for bit (under pipeline parallelism stage by
  stage, also each stage's output and input gradient; ``train/sdc_check.py``);
- cross-replica: every ``sdc.replica_interval`` steps, after the optimizer step, the parameters that
  dp (dense) or edp (experts) replicas hold in common must hash identically on every replica.

Checksums are exact integer reductions over the tensors' bit patterns: the tensor's 32-bit words
are cut into ``_NUM_BLOCKS`` contiguous blocks, each block summed exactly in int64, and the block sums
combined with odd weights modulo 2^64. Integer addition is associative, so the checksum does not
depend on the reduction order or the device; a flipped bit b changes one block sum by +-2^b, hence
the checksum by an odd multiple of 2^b (never 0 modulo 2^64). One memory pass per tensor, and
``checksums`` moves the block sums of all tensors to the host in a single transfer.

``FaultInjector`` flips one chosen bit on purpose so tests can prove every injected fault is found.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from longcat.config.schema import FaultInjection, FaultTarget

logger = logging.getLogger(__name__)

_NUM_BLOCKS = 8
# Odd weights: the first _NUM_BLOCKS for the block sums, the rest for the < _NUM_BLOCKS tail words.
_WEIGHTS = (0x1E3779B1, 0x05EBCA77, 0x42B2AE3D, 0x27D4EB2F, 0x165667B1, 0x53A2646D, 0x7D7046C5, 0x355A4F09,
            0x61C88647, 0x2545F491, 0x4F1BBCDD, 0x0B4B82E7, 0x3C6EF373, 0x7A646E4D, 0x1B873593, 0x6B43A9B5)
_MASK64 = (1 << 64) - 1


def _word_sums(tensor: torch.Tensor) -> torch.Tensor:
    """[2 * _NUM_BLOCKS] int64 on the tensor's device: exact sums of its signed 32-bit words per
    contiguous block, then the tail words (fewer than _NUM_BLOCKS) one by one, zero-padded."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 4:  # 1- or 2-byte dtypes with an odd byte count (small tensors): pad to a word
        raw = torch.cat([raw, raw.new_zeros((-raw.numel()) % 4)])
    words = raw.view(torch.int32)
    body = words.numel() - words.numel() % _NUM_BLOCKS
    out = torch.zeros(2 * _NUM_BLOCKS, dtype=torch.int64, device=words.device)
    if body:
        # Each block sum is exact: at most 2^31 * numel / 8 in magnitude, far inside int64.
        out[:_NUM_BLOCKS] = torch.sum(words[:body].view(_NUM_BLOCKS, -1), dim=1, dtype=torch.int64)
    tail = words[body:]
    out[_NUM_BLOCKS: _NUM_BLOCKS + tail.numel()] = tail.to(torch.int64)
    return out


def _combine(sums: list[int], numel: int) -> int:
    """The checksum from ``_word_sums``: sum of weight x word sum modulo 2^64, as a signed int64."""
    total = sum(w * s for w, s in zip(_WEIGHTS, sums)) & _MASK64
    if total >= 1 << 63:
        total -= 1 << 64
    return total ^ (numel << 1)


def tensor_checksum(tensor: torch.Tensor) -> int:
    """An exact, order-independent checksum of ``tensor``'s bits (any dtype, any device).

    Returns a Python int in the int64 range; equal tensors (bitwise) give equal checksums, a single
    flipped bit never leaves it unchanged. Reads the tensor once; one host sync.
    """
    return _combine(_word_sums(tensor).tolist(), tensor.numel())


def checksums(named: Iterable[tuple[str, Optional[torch.Tensor]]]) -> dict[str, int]:
    """Checksums of every named tensor that is not None (DTensors: the local shard), one host sync."""
    present: list[tuple[str, torch.Tensor]] = [
        (name, t.to_local() if hasattr(t, "to_local") else t) for name, t in named if t is not None
    ]
    if not present:
        return {}
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(present):
        by_device.setdefault(t.device, []).append(i)
    sums: list[list[int]] = [[] for _ in present]
    for indices in by_device.values():
        stacked = torch.stack([_word_sums(present[i][1]) for i in indices]).tolist()
        for i, row in zip(indices, stacked):
            sums[i] = row
    return {name: _combine(row, t.numel()) for (name, t), row in zip(present, sums)}


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

    Each rank all-gathers the [P] int64 checksum vector over ``group``. Per parameter the reference is
    the checksum most replicas hold (ties: the lowest group rank's); every rank holding another one is
    reported, identically on every rank of the group. With two replicas the report cannot tell which
    of the two is corrupt: it names the higher rank.
    """
    if group is None or dist.get_world_size(group) == 1:
        return []
    named = list(named_params)
    local_P = torch.tensor(list(checksums(named).values()), dtype=torch.int64)
    gathered = [torch.empty_like(local_P) for _ in range(dist.get_world_size(group))]
    # [P] int64 -> all_gather(group) -> world x [P]
    dist.all_gather(gathered, local_P, group=group)
    sums_RP = torch.stack(gathered)
    ranks = dist.get_process_group_ranks(group)
    found = []
    for i in torch.nonzero((sums_RP != sums_RP[0]).any(dim=0)).flatten().tolist():
        column = sums_RP[:, i].tolist()
        reference = max(column, key=lambda v: (column.count(v), -column.index(v)))
        found += [Mismatch(step=step, rank=member, tensor=named[i][0], first=reference, second=value, check="replica")
                  for member, value in zip(ranks, column) if value != reference]
    return found


def flip_bit_(tensor: torch.Tensor, *, index: int, bit: int) -> None:
    """Flip bit ``bit`` of element ``index`` (modulo numel) of ``tensor`` in place (fp32/bf16/int).

    A DTensor (an FSDP2 / TP shard) has its local shard flipped, on this rank alone: indexing the
    DTensor itself would redistribute it, a collective the other ranks never enter."""
    with torch.no_grad():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        flat = local.view(-1)
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

    ``SDCMonitor`` (``train/sdc_check.py``) registers ``activation_hook`` around the first forward of
    the replayed micro-batch (under PP: its first isolated run through the stages), calls
    ``after_backward`` after its first backward (``after_backward_grads`` under DeepSpeed, where the
    first gradient is taken with ``torch.autograd.grad``) and ``after_optimizer`` after the optimizer
    step. Replays never receive the fault (it models a transient hardware error).
    Steps are numbered from 1 (the step being computed, ``StepResult.step``); ``rank`` is global.
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
            if self.injected_at is not None:
                return output
            # A flipped copy replaces the output (the output may be a view autograd forbids editing).
            target = output[0] if isinstance(output, tuple) and output else output
            if not isinstance(target, torch.Tensor):
                raise ValueError(f"sdc.inject.tensor={self.cfg.tensor!r}: that module returns a "
                                 f"{type(target).__name__}, not a tensor, so no activation bit can be flipped; name "
                                 "a module whose output is a tensor (e.g. a linear layer inside it)")
            target = target.clone()
            flip_bit_(target, index=self.cfg.index, bit=self.cfg.bit)
            self.injected_at = step
            logger.warning("injected fault: activation %s bit %d at step %d", self.cfg.tensor, self.cfg.bit, step)
            return (target, *output[1:]) if isinstance(output, tuple) else target

        return modules[self.cfg.tensor].register_forward_hook(hook)

    def check_activation_injected(self, *, step: int) -> None:
        """After the forward ``activation_hook`` watched: an armed activation fault whose module never
        ran (its hook never fired) is an error, not a silent no-op.

        Raises:
            ValueError: naming the module (e.g. ``lm_head`` under ``loss.lm_head_ce=fused``)."""
        if self._armed(step, FaultTarget.activation):
            raise ValueError(f"sdc.inject.tensor={self.cfg.tensor!r}: the module did not run in the forward of "
                             f"step {step} on rank {self.rank}, so no activation fault was injected; name a module "
                             "that runs (e.g. model.norm; lm_head does not run under loss.lm_head_ce=fused)")

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

    def after_backward_grads(self, named_grads: dict[str, Optional[torch.Tensor]], *, step: int) -> None:
        """``after_backward`` for gradients held outside ``.grad`` (name -> gradient; the SDC replay
        under DeepSpeed takes them with ``torch.autograd.grad``)."""
        if not self._armed(step, FaultTarget.gradient):
            return
        if named_grads.get(self.cfg.tensor) is None:
            raise ValueError(f"sdc.inject.tensor={self.cfg.tensor!r} is not a parameter with a gradient at step "
                             f"{step}; e.g. {sorted(n for n, g in named_grads.items() if g is not None)[:5]}")
        grad = named_grads[self.cfg.tensor]
        assert grad is not None
        flip_bit_(grad, index=self.cfg.index, bit=self.cfg.bit)
        self.injected_at = step
        logger.warning("injected fault: gradient of %s bit %d at step %d", self.cfg.tensor, self.cfg.bit, step)

    def after_optimizer(self, model: torch.nn.Module, *, step: int) -> None:
        if self._armed(step, FaultTarget.parameter):
            self._flip_param(model, step=step, grad=False)
