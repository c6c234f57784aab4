"""Failure-safe steps of a checkpoint save: agreeing that every rank wrote its part, discarding old ones.

``CheckpointManager.save`` (``longcat.train.checkpoint``) calls these; the fault list they answer is in
docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full) on at least one rank.

    Raised on every rank; nothing was renamed into place, so the previous complete checkpoint is
    intact and ``train.resume=auto`` continues from it once the cause is fixed.
    """


def _describe(failure: BaseException) -> str:
    failures = getattr(failure, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {r}: {_describe(f[0] if isinstance(f, tuple) else f)}"
                         for r, f in sorted(failures.items()))
    return f"{type(failure).__name__}: {failure}" if not isinstance(failure, OSError) else str(failure)


def _errno(failure: BaseException) -> int:
    if isinstance(failure, OSError) and failure.errno:
        return failure.errno
    for f in (getattr(failure, "failures", None) or {}).values():
        inner = f[0] if isinstance(f, tuple) else f
        if isinstance(inner, OSError) and inner.errno:
            return inner.errno
    return errno.EIO


def agree_written(failure: Optional[BaseException], *, group: Optional[dist.ProcessGroup], rank: int,
                  final: Path, tmp: Path, previous: Optional[Path]) -> None:
    """Collective over ``group`` (in place of a barrier): raise on every rank if any rank failed.

    Args:
        failure: this rank's exception from its part of the save, or None.
        group: the ranks saving together (the world group); ``None`` or size 1: one process.
        rank: this rank in ``group`` (rank 0 removes the temporary folder).
        final, tmp: the checkpoint's final and temporary folders.
        previous: the latest complete checkpoint before this save (named in the error).

    Raises:
        CheckpointWriteError: naming the failing ranks, their errors, the folder, and what survives.
    """
    messages = []
    if failure is not None:  # DCP's CheckpointException already names its ranks
        messages = [_describe(failure) if getattr(failure, "failures", None) else f"rank {rank}: {_describe(failure)}"]
    codes = [_errno(failure)] if failure is not None else []
    world_size = 1 if group is None else group.size()
    if world_size > 1:
        # [1] int32 -> all_reduce(max, world) -> [1]; the messages travel only when something failed
        flag = torch.tensor([int(failure is not None)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if not flag.item():
            return
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (messages, codes), group=group)
        messages = list(dict.fromkeys(m for ms, _ in gathered for m in ms))  # DCP failures repeat on every rank
        codes = [c for _, cs in gathered for c in cs]
    elif failure is None:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; it never held a usable checkpoint
    survivor = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    code = next((c for c in codes if c != errno.EIO), codes[0] if codes else errno.EIO)
    raise CheckpointWriteError(
        code, f"could not write checkpoint {final} ({'; '.join(messages)}); nothing was renamed into place, so "
        f"{survivor}: free space on (or repair) {final.parent} and relaunch with train.resume=auto")


def damaged_checkpoint_message(path: Path, failure: BaseException) -> str:
    """The error for a complete checkpoint that cannot be read back (damaged after it was written)."""
    others = sorted(p.name for p in Path(path).parent.glob("step_*") if p.name != Path(path).name and "." not in p.name)
    fallback = f"; the older complete checkpoints are {others}" if others else ""
    cause = _describe(failure).splitlines()[0].split(". ")[0]
    return (f"cannot read checkpoint {path}: {cause}. It was complete when written, "
            f"so it was damaged afterwards (disk, copy, or edit): restore it from a copy, or move it aside (e.g. to "
            f"{Path(path).name}.damaged) so that train.resume=auto picks the previous one{fallback}")


def discard(path: Path, *, before_delete: Optional[Callable[[Path], None]] = None) -> None:
    """Delete a complete checkpoint folder: rename it to ``<name>.trash`` first (atomic), then delete.

    A process killed mid-delete leaves a ``.trash`` folder (swept by the next save), never a
    ``step_N`` with some of its files gone. ``before_delete(trash)`` runs between the two.
    """
    trash = path.with_name(path.name + ".trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    if before_delete is not None:
        before_delete(trash)
    shutil.rmtree(trash, ignore_errors=True)
