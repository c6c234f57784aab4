"""Fault injection for the reliability tests: pause, fail or die at a named point of a training run.

``FaultInjection`` is a ``Callback`` that a test adds to a run; production code only offers the hooks
(``Callback.on_step_end`` and ``CheckpointManager``'s save-phase observers) and reads no fault settings.
Tests describe the faults as a ``FaultPlan`` and launch the run through
``python -m longcat.testing.fault_train`` (``testing/jobs.py`` does this when given ``faults=``);
see docs/reliability.md. The specs keep one string form each, so they travel as command-line options:

``save_pause="PHASE[@STEP][:SECONDS]"`` (``--fault-save-pause``)
    At save phase ``PHASE`` (of checkpoint ``STEP``; any step if omitted) touch the marker file
    ``MARKER_DIR/paused-PHASE-stepN-rankR`` and sleep ``SECONDS`` (default 3600), so a test can
    SIGKILL the process exactly there, or watch a preemption deadline expire.
``save_error="PHASE[@STEP][:RANK]"`` (``--fault-save-error``)
    Raise ``OSError(ENOSPC)`` ("disk full") at that phase, on ``RANK`` only (default: every rank).
``kill_at_step="STEP[:RANK]"`` (``--fault-kill-at-step``, with ``once_marker``: ``--fault-once-marker``)
    After optimizer step ``STEP`` (after its checkpoint, before the preemption check) SIGKILL this
    process on ``RANK`` (default 0). With a marker path the kill happens once: the marker is created
    first, and a process that finds it does nothing (so a restarted worker survives).

Phases: ``longcat.train.checkpoint.SAVE_PHASES`` (``shards``, ``state``, ``rename``, ``retention``,
``discard``; the checkpoint module's docstring says where each one is).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

from longcat.train.callbacks import Callback, FitState
from longcat.train.checkpoint import SAVE_PHASES

if TYPE_CHECKING:
    from longcat.train.trainer import Trainer

__all__ = ["FaultInjection", "FaultPlan", "SAVE_PHASES"]

logger = logging.getLogger(__name__)


class _PhaseSpec(NamedTuple):
    phase: str
    step: Optional[int]  # None: any step
    value: Optional[float]  # seconds (pause) or rank (error); None: the default


def _parse_phase_spec(name: str, spec: Optional[str]) -> Optional[_PhaseSpec]:
    if not spec:
        return None
    head, _, value = spec.partition(":")
    phase, _, step = head.partition("@")
    if phase not in SAVE_PHASES:
        raise ValueError(f"{name}={spec!r}: phase must be one of {SAVE_PHASES}")
    return _PhaseSpec(phase, int(step) if step else None, float(value) if value else None)


@dataclass(frozen=True)
class FaultPlan:
    """The faults of one launch (the module docstring gives each spec's form); empty: none.

    Raises:
        ValueError: a spec names an unknown save phase or is malformed.
    """

    save_pause: Optional[str] = None
    save_error: Optional[str] = None
    kill_at_step: Optional[str] = None
    once_marker: Optional[Path] = None
    marker_dir: Optional[Path] = None  # where save_pause's markers go (default: the working directory)

    def __post_init__(self) -> None:
        _parse_phase_spec("save_pause", self.save_pause)
        _parse_phase_spec("save_error", self.save_error)
        if self.kill_at_step:
            at_step, _, rank = self.kill_at_step.partition(":")
            int(at_step), int(rank or 0)

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def to_args(self) -> list[str]:
        """The ``longcat.testing.fault_train`` options that rebuild this plan."""
        return [arg for f in fields(self) if getattr(self, f.name)
                for arg in (_option(f.name), str(getattr(self, f.name)))]

    @classmethod
    def parse_args(cls, argv: Sequence[str]) -> tuple[FaultPlan, list[str]]:
        """Split ``argv`` into the plan (its ``--fault-*`` options) and the remaining arguments."""
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        for f in fields(cls):
            parser.add_argument(_option(f.name), dest=f.name, default=None)
        known, rest = parser.parse_known_args(list(argv))
        values = vars(known)
        for name in ("once_marker", "marker_dir"):
            values[name] = Path(values[name]) if values[name] else None
        return cls(**values), rest


def _option(name: str) -> str:
    return "--fault-" + name.replace("_", "-")


class FaultInjection(Callback):
    """Carries out a ``FaultPlan`` inside a training process (see the module docstring)."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan
        self.pause = _parse_phase_spec("save_pause", plan.save_pause)
        self.error = _parse_phase_spec("save_error", plan.save_error)

    def on_save_phase(self, phase: str, *, step: int, path: Path, rank: int) -> None:
        """Raises: OSError (ENOSPC) when ``save_error`` names this phase, step and rank."""
        pause = self.pause
        if pause is not None and pause.phase == phase and pause.step in (None, step):
            marker_dir = self.plan.marker_dir or Path(".")
            marker_dir.mkdir(parents=True, exist_ok=True)
            (marker_dir / f"paused-{phase}-step{step}-rank{rank}").touch()
            logger.warning("fault hook: pausing in checkpoint save phase %r of step %d", phase, step)
            time.sleep(pause.value if pause.value is not None else 3600.0)
        error = self.error
        if error is not None and error.phase == phase and error.step in (None, step):
            if error.value is None or int(error.value) == rank:
                raise OSError(errno.ENOSPC, "No space left on device (injected by --fault-save-error)", str(path))

    def on_step_end(self, trainer: Trainer, state: FitState) -> None:
        """SIGKILLs this process after the step ``kill_at_step`` names, on its rank."""
        if not self.plan.kill_at_step:
            return
        at_step, _, rank = self.plan.kill_at_step.partition(":")
        if int(at_step) != trainer.step or int(rank or 0) != trainer.groups.rank:
            return
        if self.plan.once_marker is not None:
            try:
                fd = os.open(self.plan.once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process wins
            except FileExistsError:
                return
            os.close(fd)
        logger.warning("fault hook: killing rank %d after step %d", trainer.groups.rank, trainer.step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
