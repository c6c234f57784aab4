"""Test-only fault hooks: pause, fail or die at a named point of a run, driven by environment variables.

Every hook is a no-op unless its variable is set, so production runs pay one dictionary lookup. The
reliability tests (tests/integration/test_chaos.py, test_restart.py, test_bad_input.py; see
docs/reliability.md) launch real training processes with these set:

``LONGCAT_FAULT_SAVE_PAUSE="PHASE[@STEP][:SECONDS]"``
    At save phase ``PHASE`` (of checkpoint ``STEP``; any step if omitted) write the marker file
    ``$LONGCAT_FAULT_DIR/paused-PHASE-stepN-rankR`` and sleep ``SECONDS`` (default 3600), so a test
    can SIGKILL the process exactly there, or watch a preemption deadline expire.
``LONGCAT_FAULT_SAVE_ERROR="PHASE[@STEP][:RANK]"``
    Raise ``OSError(ENOSPC)`` ("disk full") at that phase, on ``RANK`` only (default: every rank).
``LONGCAT_FAULT_KILL_AT_STEP="STEP[:RANK]"`` (with ``LONGCAT_FAULT_ONCE_MARKER=PATH``)
    After optimizer step ``STEP`` (before its checkpoint) SIGKILL this process on ``RANK`` (default 0).
    With a marker path the kill happens once: the marker is created first, and a process that finds
    it does nothing (so a restarted worker survives).

Save phases, in order (``CheckpointManager.save``): ``shards`` (this rank's DCP files and RNG state
are in ``step_N.tmp/``, before the ranks agree), ``state`` (rank 0, before ``trainer_state.pt``),
``rename`` (rank 0, ``trainer_state.pt`` written, before ``step_N.tmp -> step_N``), ``retention``
(rank 0, after the rename, before old checkpoints are discarded), ``discard`` (rank 0, an old
checkpoint renamed to ``.trash``, before it is deleted).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple, Optional

logger = logging.getLogger(__name__)

SAVE_PHASES = ("shards", "state", "rename", "retention", "discard")
ENV_SAVE_PAUSE = "LONGCAT_FAULT_SAVE_PAUSE"
ENV_SAVE_ERROR = "LONGCAT_FAULT_SAVE_ERROR"
ENV_KILL_AT_STEP = "LONGCAT_FAULT_KILL_AT_STEP"
ENV_ONCE_MARKER = "LONGCAT_FAULT_ONCE_MARKER"
ENV_DIR = "LONGCAT_FAULT_DIR"


class _PhaseSpec(NamedTuple):
    phase: str
    step: Optional[int]  # None: any step
    value: Optional[float]  # seconds (pause) or rank (error); None: the default


def _parse_phase_spec(variable: str) -> Optional[_PhaseSpec]:
    spec = os.environ.get(variable)
    if not spec:
        return None
    head, _, value = spec.partition(":")
    phase, _, step = head.partition("@")
    if phase not in SAVE_PHASES:
        raise ValueError(f"{variable}={spec!r}: phase must be one of {SAVE_PHASES}")
    return _PhaseSpec(phase, int(step) if step else None, float(value) if value else None)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_phase(phase: str, *, step: int, path: Path) -> None:
    """Called by ``CheckpointManager.save`` at each of ``SAVE_PHASES`` (``path``: the folder being written).

    Raises:
        OSError: ENOSPC, when ``LONGCAT_FAULT_SAVE_ERROR`` names this phase, step and rank.
    """
    pause = _parse_phase_spec(ENV_SAVE_PAUSE)
    if pause is not None and pause.phase == phase and pause.step in (None, step):
        marker_dir = Path(os.environ.get(ENV_DIR, "."))
        marker_dir.mkdir(parents=True, exist_ok=True)
        (marker_dir / f"paused-{phase}-step{step}-rank{_rank()}").touch()
        logger.warning("fault hook: pausing in checkpoint save phase %r of step %d", phase, step)
        time.sleep(pause.value if pause.value is not None else 3600.0)
    error = _parse_phase_spec(ENV_SAVE_ERROR)
    if error is not None and error.phase == phase and error.step in (None, step):
        if error.value is None or int(error.value) == _rank():
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_SAVE_ERROR})", str(path))


def step_end(step: int) -> None:
    """Called by the trainer after optimizer step ``step``; SIGKILLs this process when told to."""
    spec = os.environ.get(ENV_KILL_AT_STEP)
    if not spec:
        return
    at_step, _, rank = spec.partition(":")
    if int(at_step) != step or int(rank or 0) != _rank():
        return
    marker = os.environ.get(ENV_ONCE_MARKER)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process wins
        except FileExistsError:
            return
        os.close(fd)
    logger.warning("fault hook: killing rank %d after step %d", _rank(), step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
