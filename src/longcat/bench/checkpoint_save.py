"""Checkpoint save time: how long the training loop stops for a save, synchronous and asynchronous.

Synchronous: the wall time of ``CheckpointManager.save`` (model + AdamW state through DCP, RNG,
trainer state, fsync, atomic rename, retention), the loop's stall for a save.

Asynchronous: ``torch.distributed.checkpoint.async_save`` of the same ``{"model", "optim"}`` state
dict with the thread checkpointer, which works in one process without a process group. The loop
stalls from ``get_state_dict`` until ``async_save`` returns (the state is staged, i.e. copied, before
it returns); training then continues while a background thread writes. We report that stall, the
time until the write completes, the training steps run meanwhile and their slowdown, and check that
the checkpoint holds the weights as of the save call, not the ones the later steps wrote in place.
(``CheckpointManager`` has no async path yet: this measures the DCP part it would use.)
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from longcat.bench.common import BenchResult, Table, load_preset, median, timed
from longcat.bench.training import OursStep, build_ours, make_batch
from longcat.train.checkpoint import CheckpointManager

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass(frozen=True)
class CheckpointSettings:
    preset: str = "small"
    batch_size: int = 4
    seq_len: int = 256
    repeats: int = 3
    max_steps_during_async: int = 20
    directory: str = ""  # "" = a fresh folder under the system temp dir
    seed: int = 0

    @classmethod
    def for_mode(cls, *, quick: bool) -> CheckpointSettings:
        return cls(preset="tiny", batch_size=2, seq_len=64, repeats=1, max_steps_during_async=5) if quick else cls()


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _async_round(step: OursStep, directory: Path, *, max_steps: int) -> dict:
    """One async save while training continues; returns stall, completion and consistency figures."""
    model, optimizer = step.model, step.optimizer
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    pending = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    stall_s = time.perf_counter() - start
    future = pending.upload_completion if isinstance(pending, AsyncSaveResponse) else pending
    steps_s: list[float] = []
    while not future.done() and len(steps_s) < max_steps:
        steps_s.append(timed(step)[1].wall_s)
    future.result()
    total_s = time.perf_counter() - start
    restored = {k: torch.zeros_like(v) for k, v in snapshot.items()}
    dcp.load({"model": restored}, checkpoint_id=str(directory))
    consistent = all(torch.equal(restored[k], snapshot[k]) for k in snapshot)
    changed = any(not torch.equal(model.state_dict()[k], snapshot[k]) for k in snapshot)
    return {"stall_s": stall_s, "total_s": total_s, "steps_s": steps_s, "consistent": consistent,
            "weights_changed_meanwhile": changed, "size_mib": _dir_mib(directory)}


def run(*, quick: bool = False, settings: CheckpointSettings | None = None) -> BenchResult:
    """Synchronous and asynchronous save of a model + AdamW state; see the module doc."""
    s = settings or CheckpointSettings.for_mode(quick=quick)
    start = time.perf_counter()
    cfg = load_preset(s.preset)
    step = OursStep(build_ours(cfg, seed=s.seed), batch=make_batch(cfg, batch_size=s.batch_size, seq_len=s.seq_len))
    baseline_s = [timed(step)[1].wall_s for _ in range(3)][1:]  # the first step creates the AdamW state
    root = Path(s.directory) if s.directory else Path(tempfile.mkdtemp(prefix="longcat-bench-ckpt-"))
    try:
        manager = CheckpointManager(root / "sync", keep_last=1)
        sync_s, size_mib = [], 0.0
        for i in range(s.repeats):
            path, t = timed(functools.partial(manager.save, i + 1, model=step.model, optimizer=step.optimizer,
                                              trainer_state={"step": i + 1}))
            sync_s.append(t.wall_s)
            size_mib = _dir_mib(path)
        rounds = [_async_round(step, root / f"async_{i}", max_steps=s.max_steps_during_async) for i in range(s.repeats)]
    finally:
        if not s.directory:
            shutil.rmtree(root, ignore_errors=True)
    step_s = median(baseline_s)
    during = [t for r in rounds for t in r["steps_s"]]
    metrics = {
        "checkpoint_size_mib": size_mib,
        "sync_save_s": median(sync_s),
        "sync_write_mib_per_s": size_mib / median(sync_s),
        "async_stall_s": median([r["stall_s"] for r in rounds]),
        "async_total_s": median([r["total_s"] for r in rounds]),
        "async_stall_fraction_of_sync": median([r["stall_s"] for r in rounds]) / median(sync_s),
        "async_steps_during_save": sum(len(r["steps_s"]) for r in rounds) / len(rounds),
        "async_step_slowdown": (median(during) / step_s) if during else 1.0,
        "async_consistent": all(r["consistent"] for r in rounds),
        # Only meaningful if training changed the weights while the write was in flight.
        "async_weights_changed_during_save": any(r["weights_changed_meanwhile"] for r in rounds),
        "train_step_s": step_s,
    }
    tables = [Table("Training-loop stall per checkpoint save", ["quantity", "value"], [
        ["checkpoint size (model + AdamW state)", f"{size_mib:.1f} MiB"],
        ["synchronous CheckpointManager.save (stall)", f"{metrics['sync_save_s']:.3f} s "
                                                       f"({metrics['sync_write_mib_per_s']:.0f} MiB/s)"],
        ["async_save: stall until it returns", f"{metrics['async_stall_s']:.3f} s "
                                               f"({100 * metrics['async_stall_fraction_of_sync']:.0f}% of sync)"],
        ["async_save: until the write completes", f"{metrics['async_total_s']:.3f} s"],
        ["training steps run during the async write", f"{metrics['async_steps_during_save']:.1f} "
                                                      f"(x{metrics['async_step_slowdown']:.2f} step time)"],
        ["async checkpoint holds the weights as of the save call", f"{metrics['async_consistent']} (weights changed "
                                                                   f"during the write: "
                                                                   f"{metrics['async_weights_changed_during_save']})"],
        ["training step (no save)", f"{step_s:.3f} s"],
    ])]
    notes = [f"model preset {s.preset!r} after one AdamW step; {s.repeats} save(s) of each kind to "
             f"{s.directory or 'a temp dir'}; async = DCP thread checkpointer without a process group.",
             "Step slowdown during the async write is measured against steps just before the saves."]
    return BenchResult(name="checkpoint", title="Checkpoint save: synchronous vs asynchronous", metrics=metrics,
                       tables=tables, settings=dataclasses.asdict(s), notes=notes, wall_s=time.perf_counter() - start)
