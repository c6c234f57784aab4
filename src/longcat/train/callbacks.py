"""What ``Trainer.fit`` does around the optimizer steps, as callbacks.

A callback overrides the hooks it needs; each default does nothing. ``Trainer(callbacks=...)`` adds
callbacks to a run (the reliability tests' fault injection, ``longcat.testing.faults``): they also
observe the checkpoint saves (``on_save_phase``, see ``longcat.train.checkpoint.SAVE_PHASES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from longcat.train.metrics import MetricsSink
    from longcat.train.trainer import Trainer


@dataclass
class FitState:
    """What one ``Trainer.fit`` shares with its callbacks.

    Attributes:
        sink: the run's metrics sink (writes on rank 0 only).
        summary: what ``fit`` returns (validation losses, checkpoint, stop step, paths).
        metrics: the record of the step just taken (``Trainer.step_metrics``), before it is logged.
        stop: set by a callback to end the loop once this step's callbacks have run.
    """

    sink: MetricsSink
    summary: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    stop: bool = False


class Callback:
    """A hook into ``Trainer.fit``; every rank runs every hook (a hook may call collectives)."""

    def setup(self, trainer: Trainer, state: FitState) -> None:
        """Before anything else in ``fit``."""

    def on_train_start(self, trainer: Trainer, state: FitState) -> None:
        """After every callback's ``setup``, before the first step."""

    def on_step_end(self, trainer: Trainer, state: FitState) -> None:
        """After optimizer step ``trainer.step`` (not after a step undone by an SDC rollback)."""

    def teardown(self, trainer: Trainer, state: FitState) -> None:
        """When ``fit`` ends, also on an error (after a failed ``setup`` too)."""

    def on_save_phase(self, phase: str, *, step: int, path: Path, rank: int) -> None:
        """A checkpoint save reached ``phase`` (``CheckpointManager``'s ``SaveObserver``)."""
