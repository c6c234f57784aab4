"""Multi-stage runs: the LongCat-Flash training pipeline and model growth, as chains of recipes.

PAPER.md §3 trains in stages, each starting from the previous stage's final checkpoint:
pre-training -> mid-training -> long-context extension -> agentic SFT. A new stage loads only the
weights (``train.init_from=``): a fresh optimizer, LR schedule and data position, as its recipe says.
``pretrain_growth`` trains a half-depth model, stacks it twice (§3.1.2, ``tools/grow_model.py``) and
continues with the full depth, keeping the training state.

Each stage runs as its own ``python -m longcat.train`` process (so a stage may use torchrun-style
launch overrides later), writing to ``<out_root>/<stage>/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from longcat.train.checkpoint import latest_checkpoint


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    init_from_previous: bool = True  # weights only, from the previous stage's final checkpoint
    grow_factor: int = 0  # > 1: grow the previous stage's checkpoint and resume from it (full state)


PIPELINES: dict[str, tuple[Stage, ...]] = {
    "pipeline": (
        Stage("pretrain", "pretrain", init_from_previous=False),
        Stage("midtrain", "midtrain"),
        Stage("long_context", "long_context"),
        Stage("sft", "sft"),
    ),
    "pretrain_growth": (
        Stage("half_depth", "pretrain", ("model.num_layers=1", "train.steps=300"), init_from_previous=False),
        Stage("grown", "pretrain", ("model.num_layers=2",), init_from_previous=False, grow_factor=2),
    ),
}


@dataclass
class StageResult:
    name: str
    out_dir: str
    final_checkpoint: Optional[str]
    initial_val_loss: Optional[float] = None
    final_val_loss: Optional[float] = None
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)


def _val_losses(metrics: Path) -> list[float]:
    if not metrics.is_file():
        return []
    values = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("val/loss"), (int, float)):
            values.append(float(record["val/loss"]))
    return values


def run_pipeline(name: str, *, out_root: Path, overrides: Sequence[str] = (), python: str = sys.executable,
                 stages: Optional[Sequence[str]] = None) -> list[StageResult]:
    """Run the named pipeline's stages in order; returns one result per stage.

    Args:
        overrides: Hydra overrides added to every stage (e.g. ``logging.wandb.mode=disabled``).
        stages: run only these stage names (their predecessors' checkpoints must exist).
    Raises:
        ValueError: an unknown pipeline or stage name. RuntimeError: a stage's process failed.
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {sorted(PIPELINES)}")
    chain = PIPELINES[name]
    names = [s.name for s in chain]
    if stages:
        unknown = sorted(set(stages) - set(names))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown} of pipeline {name!r}; stages are {names}")
    results: list[StageResult] = []
    previous: Optional[Path] = None
    for stage in chain:
        out_dir = Path(out_root) / stage.name
        if stages and stage.name not in stages:
            previous = latest_checkpoint(out_dir / "checkpoints")
            continue
        # the stage's own overrides come last: they define the stage (e.g. half depth) and win
        args = [f"recipe={stage.recipe}", f"train.out_dir={out_dir}", *overrides, *stage.overrides]
        if stage.grow_factor > 1:
            if previous is None:
                raise ValueError(f"stage {stage.name!r} grows the previous stage's checkpoint, but there is none")
            subprocess.run([python, str(Path(__file__).resolve().parents[2] / "tools" / "grow_model.py"),
                            "--checkpoint", str(previous), "--output", str(out_dir),
                            "--factor", str(stage.grow_factor)], check=True)
        elif stage.init_from_previous and previous is not None:
            args.append(f"train.init_from={previous}")
        start = time.perf_counter()
        print(f"== stage {stage.name}: longcat-train {' '.join(args)}", flush=True)
        proc = subprocess.run([python, "-m", "longcat.train", *args])
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage.name!r} failed with exit code {proc.returncode}; see its output above")
        previous = latest_checkpoint(out_dir / "checkpoints")
        vals = _val_losses(out_dir / "metrics.jsonl")
        results.append(StageResult(name=stage.name, out_dir=str(out_dir),
                                   final_checkpoint=str(previous) if previous else None,
                                   initial_val_loss=vals[0] if vals else None,
                                   final_val_loss=vals[-1] if vals else None,
                                   wall_s=time.perf_counter() - start))
    return results
