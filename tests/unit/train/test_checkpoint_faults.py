"""CheckpointManager under faults, in one process: a failed save leaves the previous checkpoint as the
latest and nothing half-done; retention never leaves a gutted ``step_N``; save observers see every
phase in order; SIGTERM sets the stop flag."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import torch
from torch import nn

from longcat.testing.checkpoints import check_checkpoint_folder
from longcat.testing.faults import FaultInjection, FaultPlan
from longcat.train import checkpoint_io
from longcat.train.checkpoint import (
    SAVE_PHASES,
    CheckpointManager,
    CheckpointWriteError,
    latest_checkpoint,
)
from longcat.train.preemption import PreemptionWatcher


def _save(manager: CheckpointManager, step: int, model: nn.Module):
    return manager.save(step, model=model, optimizer=None, trainer_state={"step": step})


@pytest.mark.parametrize("phase", ["shards", "state", "rename"])
def test_disk_full_mid_save_keeps_the_previous_checkpoint(phase, tmp_path):
    model = nn.Linear(4, 4)
    disk_full = FaultInjection(FaultPlan(save_error=f"{phase}@2"))
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, observers=[disk_full])
    _save(manager, 1, model)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint \S+step_00000002 .*No space left "
                                                   r"on device.*step_00000001 is intact.*train.resume=auto") as info:
        _save(manager, 2, model)
    assert info.value.errno == errno.ENOSPC
    folder = check_checkpoint_folder(tmp_path / "ckpt", world_size=1)
    assert folder.complete_steps == (1,) and not folder.leftovers
    _save(CheckpointManager(tmp_path / "ckpt", keep_last=2), 2, model)  # space freed: the same step saves
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_00000002"


def test_retention_renames_before_deleting_and_a_later_save_sweeps_leftovers(tmp_path, monkeypatch):
    model = nn.Linear(4, 4)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    _save(manager, 1, model)
    # A process killed inside a delete: the old checkpoint is already renamed away, never half-gone.
    monkeypatch.setattr(checkpoint_io.shutil, "rmtree", lambda *a, **k: None)
    _save(manager, 2, model)
    assert check_checkpoint_folder(tmp_path / "ckpt", world_size=1).leftovers == ("step_00000001.trash",)
    monkeypatch.undo()
    (tmp_path / "ckpt" / "step_00000007.tmp").mkdir()  # a save cut short
    _save(manager, 3, model)
    folder = check_checkpoint_folder(tmp_path / "ckpt", world_size=1)
    assert folder.complete_steps == (3,) and not folder.leftovers


class _Recorder:
    def __init__(self):
        self.seen = []

    def on_save_phase(self, phase, *, step, path, rank):
        self.seen.append((phase, step, path.name, rank))


def test_save_observers_see_the_documented_phases_in_order(tmp_path):
    assert SAVE_PHASES == ("shards", "state", "rename", "retention", "discard")
    recorder = _Recorder()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1, observers=[recorder])
    _save(manager, 1, nn.Linear(4, 4))
    recorder.seen.clear()
    _save(manager, 2, nn.Linear(4, 4))
    assert recorder.seen == [("shards", 2, "step_00000002.tmp", 0), ("state", 2, "step_00000002.tmp", 0),
                             ("rename", 2, "step_00000002.tmp", 0), ("retention", 2, "step_00000002", 0),
                             ("discard", 1, "step_00000001.trash", 0)]


def test_fault_plan_round_trips_through_the_entry_point_options(tmp_path):
    plan = FaultPlan(save_pause="rename@4:600", kill_at_step="5:1", once_marker=tmp_path / "once",
                     marker_dir=tmp_path / "markers")
    parsed, rest = FaultPlan.parse_args([*plan.to_args(), "train.steps=3", "--cfg"])
    assert parsed == plan and rest == ["train.steps=3", "--cfg"]
    assert not FaultPlan() and FaultPlan.parse_args(["parallel.ep=2"]) == (FaultPlan(), ["parallel.ep=2"])
    with pytest.raises(ValueError, match="phase must be one of"):
        FaultPlan(save_error="sharts@2")


def test_sigterm_sets_the_stop_flag_and_uninstall_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher(timeout_s=60)
    watcher.install()
    try:
        assert not watcher.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.requested and watcher.should_stop()
        watcher.mark_checkpointed()
    finally:
        watcher.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous
    torch.manual_seed(0)  # the process carries on normally


def test_disk_full_inside_dcp_writer_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    """ENOSPC raised by DCP's own file writer (not a hook): DCP wraps it in CheckpointException, the
    manager reports the inner errno and leaves the previous checkpoint as the latest."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    model = nn.Linear(4, 4)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    _save(manager, 1, model)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_filesystem, "_write_item", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"\(rank 0: \[Errno 28\] No space left on device\)") as info:
        _save(manager, 2, model)
    assert info.value.errno == errno.ENOSPC
    folder = check_checkpoint_folder(tmp_path / "ckpt", world_size=1)
    assert folder.complete_steps == (1,) and not folder.leftovers


def test_a_non_io_error_while_writing_the_trainer_state_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    """Any error on the rank writing the trainer state (here: an object that cannot be pickled) is
    agreed on by every rank and reported as CheckpointWriteError, not left to hang the others."""
    import longcat.train.checkpoint as checkpoint

    model = nn.Linear(4, 4)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    _save(manager, 1, model)

    def unpicklable(obj, path):
        raise TypeError("cannot pickle 'generator' object")

    monkeypatch.setattr(checkpoint, "_atomic_torch_save", unpicklable)
    with pytest.raises(CheckpointWriteError, match="TypeError: cannot pickle"):
        _save(manager, 2, model)
    folder = check_checkpoint_folder(tmp_path / "ckpt", world_size=1)
    assert folder.complete_steps == (1,) and not folder.leftovers
