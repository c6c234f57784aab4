"""Layout equivalence: run a few optimizer steps of a tiny model under a parallel layout and compare.

``run_layouts(cfg, layouts, num_steps=3)`` starts the layouts' world size of gloo ranks once (the
harness of ``longcat.testing.distributed``) and runs each layout in turn: the real ``Trainer`` on
each rank (model built identically on every rank, then sharded by ``parallelize``), ``num_steps``
optimizer steps, and what the single-process run must reproduce: per-step losses and grad norms,
the expert biases after each step, and the final parameters gathered to global tensors.
``run_single`` does the same in this process (layout ``SINGLE``): the reference. ``run_tasks`` adds
checkpoints: save after the last step, or resume from a checkpoint written under another layout.

Data: by default each rank reads its dp share of the run's own data (``cfg.data``: e.g. the cached
test corpus), exactly as training does; or pass ``batches`` (per step, the *global* batch as a list
of micro-batch dicts), which are split over dp in order: dp rank r takes micro-batches
``[r * accum, (r + 1) * accum)``.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from longcat.config.schema import (
    DPMode,
    MoEChunkDim,
    MoEDispatcher,
    ParallelConfig,
    PipelineSchedule,
    RunConfig,
)
from longcat.config.validate import validate as validate_run_config
from longcat.distributed import ParallelDims, ProcessGroups
from longcat.testing.distributed import run_distributed
from longcat.train.trainer import Trainer

__all__ = ["Layout", "LayoutRun", "SINGLE", "Task", "max_relative_difference", "merged_params", "run_layouts",
           "run_single", "run_tasks"]


@dataclass(frozen=True, init=False)
class Layout:
    """A named parallel layout: ``name`` is the short id used in test tables, ``parallel`` the run's
    ``parallel`` section under it.

    ``Layout("tp2xep2", tp=2, ep=2)`` takes ``ParallelConfig``'s fields as keywords (dp defaults to 1
    here, not -1: a layout states its world size; modes may be given as strings), or
    ``Layout(name, parallel=ParallelConfig(...))`` a whole section.
    """

    name: str
    parallel: ParallelConfig

    def __init__(self, name: str, parallel: Optional[ParallelConfig] = None, **fields: Any):
        if parallel is not None and fields:
            raise ValueError(f"Layout({name!r}): give parallel= or ParallelConfig fields {sorted(fields)}, not both")
        if parallel is None:
            parallel = ParallelConfig(**{"dp": 1, **fields})
            parallel = dataclasses.replace(parallel, dp_mode=DPMode(parallel.dp_mode),
                                           pp_schedule=PipelineSchedule(parallel.pp_schedule),
                                           moe_dispatcher=MoEDispatcher(parallel.moe_dispatcher),
                                           moe_chunk_dim=MoEChunkDim(parallel.moe_chunk_dim))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "parallel", parallel)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.tp * p.pp * p.dp * p.cp

    def apply(self, cfg: RunConfig) -> RunConfig:
        """A copy of ``cfg`` whose ``parallel`` section is this layout's."""
        return dataclasses.replace(copy.deepcopy(cfg), parallel=copy.deepcopy(self.parallel))


SINGLE = Layout("single")


@dataclass
class LayoutRun:
    """What one rank saw: per step the total loss and the grad norm (identical on every rank), the
    expert biases of its layers after each step (``{layer id: [E]}``), and the final parameters as
    global tensors (``{name: tensor}``; every rank returns those of its pipeline stage)."""

    rank: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    biases: list[dict[int, torch.Tensor]] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)


def _dp_share(global_batch: Sequence[dict], *, dp_rank: int, dp_size: int) -> list[dict]:
    if len(global_batch) % dp_size:
        raise ValueError(f"{len(global_batch)} micro-batches cannot be split over dp={dp_size}")
    per_rank = len(global_batch) // dp_size
    return list(global_batch[dp_rank * per_rank: (dp_rank + 1) * per_rank])


def _layer_ids(trainer) -> list[int]:
    if trainer.pipeline is not None:
        return list(trainer.pipeline.local_layer_ids)
    return list(range(len(trainer.biases_L)))


@torch.no_grad()
def gather_global_params(parallel) -> dict[str, torch.Tensor]:
    """Every parameter of this rank as the full global tensor (collective over the tp/ep/dp groups)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for placement in parallel.placements:
        view = placement.to_global(placement.param.detach())
        out[placement.name] = (view.full_tensor() if isinstance(view, DTensor) else view).detach().clone().cpu()
    return out


@dataclass(frozen=True)
class Task:
    """One run inside a batch of runs on the same ranks.

    Attributes:
        layout: the parallel layout (its world size must be the batch's).
        num_steps: optimizer steps to run (after a resume: steps beyond the checkpoint's).
        out_dir: the run's ``train.out_dir`` ("" = a temporary folder); it resumes from the latest
            checkpoint under ``<out_dir>/checkpoints`` (``train.resume=auto``).
        resume_from: a checkpoint folder copied into ``<out_dir>/checkpoints`` first (resharding
            resume under this layout), or "".
        save: write a checkpoint after the last step.
    """

    layout: Layout
    num_steps: int = 3
    out_dir: str = ""
    resume_from: str = ""
    save: bool = False


def _groups_for(layout: Layout):

    if not dist.is_initialized():
        if layout.world_size != 1:
            raise ValueError(f"layout {layout.name} needs {layout.world_size} processes; use run_layouts")
        return ProcessGroups.single()
    return ProcessGroups.build(ParallelDims.from_config(layout.parallel, world_size=dist.get_world_size()))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _run_task(cfg: Any, task: Task, batches: Optional[list[list[dict]]]) -> LayoutRun:

    layout = task.layout
    cfg = layout.apply(cfg)
    if cfg.train.compile:
        torch._dynamo.reset()  # each layout compiles afresh: the recompile limit counts per run
    groups = _groups_for(layout)
    validate_run_config(cfg, world_size=groups.world_size)
    if (task.save or task.resume_from) and not task.out_dir and groups.world_size > 1:
        raise ValueError(f"Task(layout={layout.name!r}) saves or resumes a checkpoint on {groups.world_size} ranks: "
                         f"give it an out_dir shared by every rank (each rank's own temporary folder would "
                         f"split the checkpoint)")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(task.out_dir or tmp)
        if task.resume_from and groups.rank == 0:
            src = Path(task.resume_from)
            shutil.copytree(src, out_dir / "checkpoints" / src.name)
        _barrier()
        cfg.train.out_dir = str(out_dir)
        trainer = Trainer(cfg, groups=groups)
        run = LayoutRun(rank=groups.rank)
        layer_ids = _layer_ids(trainer)
        first = trainer.step
        for step in range(first, first + task.num_steps):
            mbs = None
            if batches is not None:
                mbs = _dp_share(batches[step], dp_rank=groups.dp_rank, dp_size=groups.dp_size)
            result = trainer.train_step(mbs)
            run.losses.append(result.loss.total)
            run.grad_norms.append(result.grad_norm)
            run.biases.append({i: b.detach().clone().cpu() for i, b in zip(layer_ids, trainer.biases_L)})
        if task.save:
            trainer.save_checkpoint()
        run.params = gather_global_params(trainer.parallel)
        _barrier()
    return run


def _run_tasks(cfg: Any, tasks: Sequence[Task], batches: Optional[list[list[dict]]]) -> list[LayoutRun]:
    out = []
    for task in tasks:
        try:
            out.append(_run_task(cfg, task, batches))
        except Exception as exc:
            raise RuntimeError(f"layout {task.layout.name}: {type(exc).__name__}: {exc}") from exc
    return out


def run_tasks(cfg: Any, tasks: Sequence[Task], *, batches: Optional[list[list[dict]]] = None,
              timeout_s: float = 300.0) -> list[list[LayoutRun]]:
    """Run ``tasks`` one after the other on the same ``world_size`` gloo ranks (one start-up for all).

    Returns:
        Per task, one ``LayoutRun`` per rank (by rank).

    Raises:
        ValueError: tasks of different world sizes.
        DistributedTestError / DistributedTimeoutError: as ``run_distributed`` (the message names the
            layout that failed).
    """
    sizes = {t.layout.world_size for t in tasks}
    if len(sizes) != 1:
        raise ValueError(f"run_tasks needs one world size, got {sorted(sizes)}: group the layouts by size")
    world_size = sizes.pop()
    if world_size == 1:
        return [[run] for run in _run_tasks(cfg, tasks, batches)]
    per_rank = run_distributed(_run_tasks, world_size=world_size, args=(cfg, list(tasks), batches),
                               timeout_s=timeout_s)
    return [[per_rank[r][i] for r in range(world_size)] for i in range(len(tasks))]


def run_layouts(cfg: Any, layouts: Sequence[Layout], *, num_steps: int = 3,
                batches: Optional[list[list[dict]]] = None, timeout_s: float = 300.0) -> dict[str, list[LayoutRun]]:
    """``num_steps`` steps of ``cfg`` under each layout (all of one world size, one start-up).

    Returns:
        ``{layout.name: [LayoutRun of each rank]}``.
    """
    runs = run_tasks(cfg, [Task(layout, num_steps) for layout in layouts], batches=batches, timeout_s=timeout_s)
    return {layout.name: r for layout, r in zip(layouts, runs)}


def run_single(cfg: Any, *, num_steps: int = 3, batches: Optional[list[list[dict]]] = None) -> LayoutRun:
    """The single-process reference, in this process (no process group)."""
    return _run_task(cfg, Task(SINGLE, num_steps), batches)


def merged_params(runs: Sequence[LayoutRun]) -> dict[str, torch.Tensor]:
    """The union of the ranks' global parameters (pipeline stages hold different ones)."""
    out: dict[str, torch.Tensor] = {}
    for run in runs:
        out.update(run.params)
    return out


def max_relative_difference(actual: Sequence[float], expected: Sequence[float]) -> float:
    """max_i |a_i - e_i| / |e_i| (0 where both are 0)."""
    diffs = [abs(a - e) / abs(e) if e else abs(a) for a, e in zip(actual, expected, strict=True)]
    return max(diffs, default=0.0)
