"""Atomic, resumable checkpoints on ``torch.distributed.checkpoint`` (DCP) that reshard across layouts.

Layout of one checkpoint, ``<out_dir>/checkpoints/step_00000100/``:
- DCP files (``.metadata``, ``*.distcp``): ``model.<name>`` (every parameter and persistent buffer)
  and ``optim.state.<name>.{exp_avg,exp_avg_sq,step}`` (AdamW), all under the *global* names of the
  single-process model and as *global* tensors: a rank's TP / EP / FSDP shard is described as a
  ``DTensor`` (expert weights indexed by global expert id), pipeline stages keep the full model's
  layer numbers. A checkpoint saved under one layout (tp, ep, pp, dp, dp_mode) therefore loads under
  any other: DCP reads each rank's pieces of the global tensors. Optimizer hyperparameters are not
  stored: they come from the config, and the LR from the schedule's step (``trainer_state.pt``);
- ``trainer_state.pt`` (rank 0): step, token counters, LR schedule step, data position, expert-bias
  controller state and the resolved config;
- ``rng/rank{R}.pt``: each rank's RNG states (restored when the same rank exists again).

Atomicity: every rank writes into ``step_N.tmp/``; once all ranks agree their part is written, rank 0
writes ``trainer_state.pt`` last and renames the folder to ``step_N`` (a rename is atomic), so a folder
without ``.tmp`` is always complete and a half-written one is never picked up. Retention discards only
complete checkpoints older than the ``keep_last`` newest, after the new one is in place, and renames
each to ``step_N.trash`` before deleting it, so a kill mid-delete never leaves a gutted ``step_N``.
A write that fails on any rank (a full disk) fails on every rank with ``CheckpointWriteError``, with
nothing renamed into place (see docs/reliability.md).

Save phases, in order, reported to the manager's ``observers`` (``SaveObserver``; the reliability
tests pause, fail or kill a save there, see ``longcat.testing.faults``): ``shards`` (this rank's DCP
files and RNG state are in ``step_N.tmp/``, before the ranks agree), ``state`` (rank 0, before
``trainer_state.pt``), ``rename`` (rank 0, ``trainer_state.pt`` written, before ``step_N.tmp ->
step_N``), ``retention`` (rank 0, after the rename, before old checkpoints are discarded),
``discard`` (rank 0, an old checkpoint renamed to ``.trash``, before it is deleted).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from longcat.atomic_files import atomic_open
from longcat.train.checkpoint_io import (  # noqa: F401 (CheckpointWriteError re-exported)
    CheckpointWriteError,
    agree_written,
    damaged_checkpoint_message,
    discard,
)
from longcat.train.nonfinite import assert_finite_state, checkpoint_tensors

logger = logging.getLogger(__name__)
# A single-process run saves without a process group; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.pt"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
# (global name, param, to_global): a parameter of a CheckpointTarget
ParamEntry = tuple[str, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]
SAVE_PHASES = ("shards", "state", "rename", "retention", "discard")  # in the order a save reaches them


class SaveObserver(Protocol):
    """Told when a save reaches each of ``SAVE_PHASES`` (on the ranks that run that phase)."""

    def on_save_phase(self, phase: str, *, step: int, path: Path, rank: int) -> None:
        """``path``: the folder at that moment (``step_N.tmp``, ``step_N``, or ``step_M.trash``).
        An exception raised here is a failure of the save at that point."""


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
class CheckpointTarget:
    """What a checkpoint holds of this rank: parameters (with a map to their global view) and buffers.

    Attributes:
        params: ``(global name, param, to_global)``; ``to_global`` maps a local tensor shaped like the
            param (the param itself or an optimizer state) to a tensor describing the global one.
        buffers: ``(global name, buffer)`` of the persistent buffers (e.g. the expert bias).
        deepspeed: the ``DeepSpeedDP`` engine whose optimizer state lives in ZeRO partitions, or None.
        aliases: further state-dict names of parameters in ``params`` (a tied ``lm_head.weight``):
            saved in the model state as ``state_dict()`` has them, no optimizer state of their own.
    """

    params: list[ParamEntry]
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    deepspeed: Any = None
    aliases: list[tuple[str, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]] = field(default_factory=list)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _persistent_buffers(modules: list[nn.Module]) -> list[tuple[str, torch.Tensor]]:
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        keys = set(module.state_dict().keys())
        for name, buf in module.named_buffers():
            if name in keys:
                out.setdefault(name, buf)
    return list(out.items())


def _aliases(modules: list[nn.Module], params: list) -> list:
    known = {name for name, _, _ in params}
    by_id = {id(p): (p, to_global) for _, p, to_global in params}
    out = []
    for module in modules:
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name not in known and id(tensor) in by_id:
                known.add(name)
                out.append((name, *by_id[id(tensor)]))
    return out


def checkpoint_target(model: Union[nn.Module, Any]) -> CheckpointTarget:
    """The target for a plain module (whole tensors, one process) or a ``ParallelModel``."""
    if isinstance(model, nn.Module):
        params: list[ParamEntry] = [(name, p, _identity) for name, p in model.named_parameters()]
        return CheckpointTarget(params=params, buffers=_persistent_buffers([model]), aliases=_aliases([model], params))
    params = [(p.name, p.param, p.to_global) for p in model.placements]
    return CheckpointTarget(params=params, buffers=_persistent_buffers(model.modules), deepspeed=model.deepspeed,
                            aliases=_aliases(model.modules, params))


def _model_state(target: CheckpointTarget) -> dict[str, torch.Tensor]:
    state = {name: to_global(p.detach()) for name, p, to_global in target.params + target.aliases}
    state.update({name: buf for name, buf in target.buffers})
    return state


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state (zeros, step 0) where a first step has not yet done so."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                for key in ADAM_STATE_KEYS:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _optim_state(target: CheckpointTarget,
                 optimizer: torch.optim.Optimizer) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{name: {exp_avg, exp_avg_sq, step}}`` as global tensors; params never stepped get zeros."""
    if target.deepspeed is not None:
        full = target.deepspeed.full_optimizer_state([(n, p) for n, p, _ in target.params])
        return {"state": full}
    _init_adam_state(optimizer)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p, to_global in target.params:
        state = optimizer.state.get(p)
        if not state:
            continue
        entry = {key: to_global(state[key]) for key in ADAM_STATE_KEYS}
        entry["step"] = state["step"] if torch.is_tensor(state["step"]) else torch.tensor(float(state["step"]))
        out[name] = entry
    return {"state": out}


@dataclass
class CheckpointManager:
    """Saves and loads checkpoints under ``root`` (all ranks of ``group`` call every method collectively).

    ``model`` arguments take a plain module (one process, whole tensors) or a
    ``longcat.model.parallel.parallelize.ParallelModel`` (this rank's shards, described globally).

    Args:
        root: the folder holding the ``step_N`` checkpoints.
        keep_last: how many complete checkpoints retention keeps.
        group: the ranks that save together, every rank of the job (``ProcessGroups.world_group``);
            ``None`` or a size-1 group: one process.
        rank: this process's rank in ``group`` (rank 0 writes the trainer state, renames, deletes).
        observers: told of each save phase (``SaveObserver``); none in production runs.
    """

    root: Path
    keep_last: int = 2
    group: Optional[dist.ProcessGroup] = None
    rank: int = 0
    observers: Sequence[SaveObserver] = ()
    last_saved_step: Optional[int] = field(default=None, init=False)  # by this manager, in this process

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, f"rank {self.rank} outside a group of {self.world_size}"

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else self.group.size()

    @property
    def _collective_group(self) -> Optional[dist.ProcessGroup]:
        """The group of the save's collectives (DCP's too) when several ranks save; ``None`` for one
        process (no agreement needed; DCP takes its own one-process path)."""
        return self.group if self.world_size > 1 else None

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def _notify(self, phase: str, *, step: int, path: Path) -> None:
        for observer in self.observers:
            observer.on_save_phase(phase, step=step, path=path, rank=self.rank)

    def _discard(self, path: Path, *, step: int) -> None:
        discard(path, before_delete=lambda trash: self._notify("discard", step=step, path=trash))

    def save(self, step: int, *, model: Union[nn.Module, Any], optimizer: Optional[torch.optim.Optimizer],
             trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and apply retention. Returns the final folder.

        Raises:
            NonFiniteCheckpointError: some rank holds a NaN/Inf parameter, buffer or optimizer state
                (checked on every rank before anything on disk is touched).
        """
        assert_finite_state(checkpoint_tensors(checkpoint_target(model), optimizer), group=self._collective_group)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in [*self.root.glob("step_*.tmp"), *self.root.glob("step_*.trash")]:
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed mid-save or mid-delete
            if final.exists():  # re-saving a step (a resumed run that did not advance)
                self._discard(final, step=step)
        self._barrier()
        previous = latest_checkpoint(self.root)
        failure: Optional[BaseException] = None
        try:
            target = checkpoint_target(model)
            state: dict[str, Any] = {"model": _model_state(target)}
            if optimizer is not None:
                state["optim"] = _optim_state(target, optimizer)
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._collective_group)
            (tmp / "rng").mkdir(parents=True, exist_ok=True)
            torch.save(_rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
            self._notify("shards", step=step, path=tmp)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            failure = e  # any error: agreed on below, or the other ranks would wait in the barrier
        agree = functools.partial(agree_written, group=self._collective_group, rank=self.rank, final=final, tmp=tmp,
                                  previous=previous)
        agree(failure)  # a barrier that fails on every rank
        if self.rank == 0:
            try:
                self._notify("state", step=step, path=tmp)
                _atomic_torch_save(trainer_state, tmp / TRAINER_STATE)
                _fsync_dir(tmp)
                self._notify("rename", step=step, path=tmp)
                os.replace(tmp, final)
            except Exception as e:  # noqa: BLE001 - reported on every rank by agree_written
                failure = e
            else:
                try:
                    _fsync_dir(self.root)
                except OSError as e:  # the rename happened; only its durability across a power cut is in doubt
                    logger.warning("could not fsync %s after writing %s: %s", self.root, final, e)
        agree(failure)
        if self.rank == 0:
            self._notify("retention", step=step, path=final)
            self._apply_retention()
        self.last_saved_step = step
        self._barrier()
        return final

    def _apply_retention(self) -> None:
        complete = list_checkpoints(self.root)
        for step, path in complete[: max(0, len(complete) - self.keep_last)]:
            try:
                self._discard(path, step=step)
            except OSError as e:  # the new checkpoint is in place; an old one lingering is harmless
                logger.warning("could not delete old checkpoint %s: %s", path, e)

    def load(self, path: Path, *, model: Union[nn.Module, Any], optimizer: Optional[torch.optim.Optimizer],
             check_config: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
        """Load model (and optimizer when given) state from ``path`` into this rank's shards; returns
        the trainer state. The checkpoint may come from any parallel layout.

        Raises:
            ValueError: ``path`` is not a complete checkpoint, or ``check_config`` rejects its config.
        """
        path = Path(path)
        if not (path / TRAINER_STATE).is_file() or not (path / ".metadata").is_file():
            raise ValueError(f"{path} is not a complete longcat checkpoint (no {TRAINER_STATE} or .metadata)")
        try:
            trainer_state = torch.load(path / TRAINER_STATE, weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(damaged_checkpoint_message(path, e)) from None
        if check_config is not None:
            check_config(trainer_state.get("config", {}))
        target = checkpoint_target(model)
        state: dict[str, Any] = {"model": _model_state(target)}
        if optimizer is not None:
            if target.deepspeed is not None:
                state["optim"] = {"state": {n: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                                                "step": torch.tensor(0.0)} for n, p, _ in target.params}}
            else:
                state["optim"] = _optim_state(target, optimizer)
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self._collective_group)
        except (CheckpointException, OSError, RuntimeError) as e:  # DCP raises on every rank alike
            raise ValueError(damaged_checkpoint_message(path, e)) from None
        with torch.no_grad():
            for name, p, _ in target.params:
                _copy_local_(p, state["model"][name])
            for name, buf in target.buffers:
                _copy_local_(buf, state["model"][name])
            if optimizer is not None and target.deepspeed is not None:
                target.deepspeed.load_full_state([(n, p) for n, p, _ in target.params], state["optim"]["state"])
            elif optimizer is not None:
                for name, p, _ in target.params:
                    entry, own = state["optim"]["state"].get(name), optimizer.state.get(p)
                    if entry is None or not own:
                        continue
                    for key in ADAM_STATE_KEYS:
                        _copy_local_(own[key], entry[key])
                    own["step"].copy_(entry["step"])
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if optimizer is not None and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer_state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _copy_local_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst's local data <- src's local data (the same shard; a no-op when they share storage)."""
    d, s = _local(dst), _local(src)
    if d.data_ptr() != s.data_ptr() or d.shape != s.shape:
        d.copy_(s)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
