"""What ``Trainer.fit`` does around the optimizer steps, as a short ordered list of callbacks.

The loop (``Trainer.fit``)::

    setup, then on_train_start          every callback, in order (Evaluate: the initial validation loss)
    until train.steps, or a stop:
        optimizer step -> metrics record    (an SDC rollback instead reloads the last good checkpoint,
                                              rewinds metrics.jsonl and trains on; no callbacks run)
        on_step_end: Evaluate -> LogMetrics -> Checkpoint -> [extra callbacks] -> Preemption
    teardown                            every callback, also after an error

The order is part of the behaviour: the validation loss joins the step's record before it is logged;
the record is logged before the checkpoint is written; extra callbacks (``Trainer(callbacks=...)``:
the reliability tests' fault injection, ``longcat.testing.faults``) see the step's checkpoint
written; Preemption is last because it may write the stop checkpoint and end the loop. Extra callbacks
also observe the checkpoint saves (``on_save_phase``, see ``longcat.train.checkpoint.SAVE_PHASES``).
Every rank runs every hook: hooks may be collective (evaluation, saves, the preemption all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from longcat.train.preemption import PreemptionWatcher

if TYPE_CHECKING:
    from longcat.config.schema import RunConfig
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
        """At the start of ``fit`` (metrics sink open, ``config.json`` written), before any evaluation."""

    def on_train_start(self, trainer: Trainer, state: FitState) -> None:
        """After every callback's ``setup``, before the first step."""

    def on_step_end(self, trainer: Trainer, state: FitState) -> None:
        """After optimizer step ``trainer.step`` (not when an SDC rollback replaced the step)."""

    def teardown(self, trainer: Trainer, state: FitState) -> None:
        """When ``fit`` ends, also on an error (after a failed ``setup`` too)."""

    def on_save_phase(self, phase: str, *, step: int, path: Path, rank: int) -> None:
        """A checkpoint save reached ``phase`` (``CheckpointManager``'s ``SaveObserver``)."""


def _due(step: int, *, interval: int, last_step: int) -> bool:
    """Every ``interval`` steps (0: never) and at the last step."""
    return bool(interval) and (step % interval == 0 or step == last_step)


class Evaluate(Callback):
    """Validation loss before the first step of a fresh run, then every ``interval`` steps and at the last
    (``train.eval_interval``; 0: never). Adds ``val/loss`` to the step's record."""

    def __init__(self, *, interval: int, last_step: int):
        self.interval, self.last_step = interval, last_step

    def on_train_start(self, trainer: Trainer, state: FitState) -> None:
        if self.interval and trainer.step == 0:
            state.summary["initial_val_loss"] = trainer.evaluate()
            state.sink.log(0, {"val/loss": state.summary["initial_val_loss"]})

    def on_step_end(self, trainer: Trainer, state: FitState) -> None:
        if _due(trainer.step, interval=self.interval, last_step=self.last_step):
            state.metrics["val/loss"] = state.summary["final_val_loss"] = trainer.evaluate()


class LogMetrics(Callback):
    """Log the step's record every ``interval`` steps (``logging.log_interval``) and whenever it holds a
    validation loss."""

    def __init__(self, *, interval: int):
        self.interval = interval

    def on_step_end(self, trainer: Trainer, state: FitState) -> None:
        if trainer.step % self.interval == 0 or "val/loss" in state.metrics:
            state.sink.log(trainer.step, state.metrics)


def _save(trainer: Trainer, state: FitState) -> None:
    path = trainer.save_checkpoint()  # None: not written (SDC checks found the replicas disagreeing)
    if path is not None:
        state.summary["checkpoint"] = str(path)


class Checkpoint(Callback):
    """Save every ``interval`` steps (``train.checkpoint_interval``; 0: never) and at the last."""

    def __init__(self, *, interval: int, last_step: int):
        self.interval, self.last_step = interval, last_step

    def on_step_end(self, trainer: Trainer, state: FitState) -> None:
        if _due(trainer.step, interval=self.interval, last_step=self.last_step):
            _save(trainer, state)


class Preemption(Callback):
    """SIGTERM / Ctrl-C on any rank: every rank stops at the same step, with a checkpoint
    (``train/preemption.py``); the signal handlers are in place for the whole of ``fit``."""

    def __init__(self, *, timeout_s: float):
        self.timeout_s = timeout_s
        self.watcher: Optional[PreemptionWatcher] = None

    def setup(self, trainer: Trainer, state: FitState) -> None:
        self.watcher = PreemptionWatcher(timeout_s=self.timeout_s, world_group=trainer.groups.world_group,
                                         rank=trainer.groups.rank)
        self.watcher.install()

    def on_step_end(self, trainer: Trainer, state: FitState) -> None:
        assert self.watcher is not None  # made by setup, before the first step
        if not self.watcher.should_stop():  # collective: SIGTERM on any rank stops every rank at this step
            return
        if trainer.checkpoints.last_saved_step != trainer.step:
            _save(trainer, state)
        self.watcher.mark_checkpointed()
        state.summary["preempted_at_step"] = trainer.step
        state.stop = True

    def teardown(self, trainer: Trainer, state: FitState) -> None:
        if self.watcher is not None:
            self.watcher.uninstall()


def fit_callbacks(cfg: RunConfig, *, extra: Sequence[Callback] = ()) -> list[Callback]:
    """The callbacks of one ``fit``, in their fixed order (see the module docstring)."""
    train = cfg.train
    return [
        Evaluate(interval=train.eval_interval, last_step=train.steps),
        LogMetrics(interval=cfg.logging.log_interval),
        Checkpoint(interval=train.checkpoint_interval, last_step=train.steps),
        *extra,
        Preemption(timeout_s=train.preempt_timeout_s),
    ]
