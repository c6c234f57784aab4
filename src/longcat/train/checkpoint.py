"""Atomic, resumable checkpoints on ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint, ``<out_dir>/checkpoints/step_00000100/``:
- DCP files (``.metadata``, ``*.distcp``): model and optimizer state under global parameter names
  (``get_state_dict``), so a later layout can reshard them;
- ``trainer_state.pt`` (rank 0): step, token counters, LR schedule, data position, expert-bias
  controller state and the resolved config;
- ``rng/rank{R}.pt``: each rank's RNG states.

Atomicity: every rank writes into ``step_N.tmp/``; after a barrier rank 0 writes ``trainer_state.pt``
last and renames the folder to ``step_N`` (a rename is atomic), so a folder without ``.tmp`` is always
complete and a half-written one is never picked up. Retention deletes only complete checkpoints older
than the ``keep_last`` newest, after the new one is in place.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
    get_model_state_dict,
    set_model_state_dict,
)

logger = logging.getLogger(__name__)
# A single-process run saves without a process group; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first, as (step, path)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / TRAINER_STATE).is_file() and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


@dataclass
class CheckpointManager:
    """Saves and loads checkpoints under ``root`` (all ranks call every method collectively)."""

    root: Path
    keep_last: int = 2

    def save(self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and apply retention. Returns the final folder."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a run killed mid-save
                shutil.rmtree(tmp)
            if final.exists():  # re-saving a step (a resumed run that did not advance)
                shutil.rmtree(final)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            _atomic_torch_save(trainer_state, tmp / TRAINER_STATE)
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._apply_retention()
        _barrier()
        return final

    def _apply_retention(self) -> None:
        complete = list_checkpoints(self.root)
        for _, path in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
             check_config: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
        """Load model (and optimizer when given) state from ``path``; returns the trainer state.

        Raises:
            ValueError: ``path`` is not a complete checkpoint, or ``check_config`` rejects its config.
        """
        path = Path(path)
        if not (path / TRAINER_STATE).is_file() or not (path / ".metadata").is_file():
            raise ValueError(f"{path} is not a complete longcat checkpoint (no {TRAINER_STATE} or .metadata)")
        trainer_state = torch.load(path / TRAINER_STATE, weights_only=False)
        if check_config is not None:
            check_config(trainer_state.get("config", {}))
        if optimizer is None:
            model_sd = get_model_state_dict(model)
            dcp.load({"model": model_sd}, checkpoint_id=str(path))
            set_model_state_dict(model, model_sd)
            return trainer_state
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / "rng" / f"rank{_rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer_state


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
