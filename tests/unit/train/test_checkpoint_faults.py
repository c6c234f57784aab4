"""CheckpointManager under faults, in one process: a failed save leaves the previous checkpoint as the
latest and nothing half-done; retention never leaves a gutted ``step_N``; SIGTERM sets the stop flag."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import torch
from torch import nn

from longcat.testing.checkpoints import check_checkpoint_folder
from longcat.train import checkpoint_io
from longcat.train.checkpoint import CheckpointManager, CheckpointWriteError, latest_checkpoint
from longcat.train.fault_hooks import ENV_SAVE_ERROR, SAVE_PHASES
from longcat.train.preemption import PreemptionWatcher


def _save(manager: CheckpointManager, step: int, model: nn.Module):
    return manager.save(step, model=model, optimizer=None, trainer_state={"step": step})


@pytest.mark.parametrize("phase", ["shards", "state", "rename"])
def test_disk_full_mid_save_keeps_the_previous_checkpoint(phase, tmp_path, monkeypatch):
    model = nn.Linear(4, 4)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    _save(manager, 1, model)
    monkeypatch.setenv(ENV_SAVE_ERROR, f"{phase}@2")
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint \S+step_00000002 .*No space left "
                                                   r"on device.*step_00000001 is intact.*train.resume=auto") as info:
        _save(manager, 2, model)
    assert info.value.errno == errno.ENOSPC
    folder = check_checkpoint_folder(tmp_path / "ckpt", world_size=1)
    assert folder.complete_steps == (1,) and not folder.leftovers
    monkeypatch.delenv(ENV_SAVE_ERROR)
    _save(manager, 2, model)
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


def test_fault_hook_phases_are_the_documented_ones():
    assert SAVE_PHASES == ("shards", "state", "rename", "retention", "discard")


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
