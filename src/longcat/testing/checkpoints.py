"""Inspect a run's checkpoint folder from outside the run: what is complete, what is left over, what it holds.

Used by the reliability tests (docs/reliability.md) after every kill: a ``step_N`` folder must be whole
(its DCP metadata, every shard file it names at full length, ``trainer_state.pt``, each rank's RNG
state); ``step_N.tmp`` (a save cut short) and ``step_N.trash`` (a delete cut short) may be left over and
are never resumed from.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from longcat.train.checkpoint import TRAINER_STATE

_COMPLETE = re.compile(r"^step_(\d{8})$")
_LEFTOVER = re.compile(r"^step_\d{8}\.(tmp|trash)$")


@dataclass(frozen=True)
class CheckpointFolder:
    complete_steps: tuple[int, ...]  # ascending
    leftovers: tuple[str, ...]  # names of step_N.tmp / step_N.trash folders

    @property
    def latest_step(self) -> int | None:
        return self.complete_steps[-1] if self.complete_steps else None


def check_checkpoint_folder(root: Path, *, world_size: int) -> CheckpointFolder:
    """Every ``step_N`` under ``root`` is whole; nothing but ``step_N``, ``.tmp`` and ``.trash`` is there.

    Raises:
        AssertionError: naming the folder and what is missing or unexpected.
    """
    root = Path(root)
    complete, leftovers = [], []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        match = _COMPLETE.match(entry.name)
        if match:
            _check_whole(entry, world_size=world_size)
            complete.append(int(match.group(1)))
        elif _LEFTOVER.match(entry.name):
            leftovers.append(entry.name)
        else:
            raise AssertionError(f"unexpected entry {entry} in the checkpoint folder")
    return CheckpointFolder(tuple(complete), tuple(leftovers))


def _check_whole(path: Path, *, world_size: int) -> None:
    required = [path / ".metadata", path / TRAINER_STATE, *(path / "rng" / f"rank{r}.pt" for r in range(world_size))]
    missing = [p.name for p in required if not p.is_file() or p.stat().st_size == 0]
    assert not missing, f"complete-looking checkpoint {path} lacks {missing}"
    end_of: dict[str, int] = {}
    for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
        end_of[info.relative_path] = max(end_of.get(info.relative_path, 0), info.offset + info.length)
    for name, end in end_of.items():
        size = (path / name).stat().st_size if (path / name).is_file() else -1
        assert size >= end, f"{path / name} is {size} bytes but the metadata needs {end}"


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(DCP state: ``{"model": {...}, "optim": {"state": {...}}}`` as plain tensors, trainer_state) of ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(path), str(out))
        state = torch.load(out, weights_only=False)
    return state, torch.load(Path(path) / TRAINER_STATE, weights_only=False)


def assert_same_state(actual: dict, expected: dict, *, where: str = "") -> None:
    """Nested dicts of tensors and plain values are equal bit for bit (tensors by ``torch.equal``)."""
    assert isinstance(actual, dict) and isinstance(expected, dict), where
    assert actual.keys() == expected.keys(), f"{where}: keys differ: {sorted(set(actual) ^ set(expected))[:5]}"
    for key, value in expected.items():
        other, here = actual[key], f"{where}.{key}" if where else str(key)
        if isinstance(value, dict):
            assert_same_state(other, value, where=here)
        elif isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and other.dtype == value.dtype and torch.equal(other, value), here
        else:
            assert other == value, f"{here}: {other!r} != {value!r}"
