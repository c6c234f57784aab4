"""Multi-stage runs: the LongCat-Flash training pipeline and model growth, as chains of recipes.

PAPER.md §3 trains in stages, each starting from the previous stage's final checkpoint:
pre-training -> mid-training -> long-context extension -> agentic SFT. A new stage loads only the
weights (``train.init_from=``): a fresh optimizer, LR schedule and data position, as its recipe says.
``pretrain_growth`` trains a half-depth model, stacks it twice (§3.1.2, ``tools/grow_model.py``) and
continues with the full depth, keeping the training state.

Pipelines are recipes too: ``recipes/pipelines/<name>.yaml`` lists the stages (name, recipe, the
stage's own overrides, whether it loads the previous stage's weights or grows its checkpoint).

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


PIPELINE_DIR = "recipes/pipelines"  # one YAML file per pipeline: a header comment and a `stages:` list
_STAGE_KEYS = {"name", "recipe", "overrides", "init_from_previous", "grow_factor"}


def _pipeline_dir() -> Path:
    from longcat.cli import project_root

    return project_root() / PIPELINE_DIR


def available_pipelines() -> list[str]:
    """Names of the pipeline recipes (``recipes/pipelines/<name>.yaml``)."""
    return sorted(p.stem for p in _pipeline_dir().glob("*.yaml"))


def load_pipeline(name: str) -> tuple[Stage, ...]:
    """The stages of pipeline recipe ``name``, in order.

    Raises:
        ValueError: an unknown pipeline, or a malformed file (naming the stage and key).
    """
    import yaml

    path = _pipeline_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown pipeline {name!r}; choose one of {available_pipelines()} ({_pipeline_dir()})")
    raw = yaml.safe_load(path.read_text()) or {}
    entries = raw.get("stages")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: needs a non-empty `stages:` list")
    stages = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "recipe" not in entry:
            raise ValueError(f"{path}: stage {i} needs at least `name:` and `recipe:`")
        unknown = sorted(set(entry) - _STAGE_KEYS)
        if unknown:
            raise ValueError(f"{path}: stage {entry['name']!r} has unknown key(s) {unknown}; allowed: {sorted(_STAGE_KEYS)}")
        stages.append(Stage(name=str(entry["name"]), recipe=str(entry["recipe"]),
                            overrides=tuple(str(o) for o in entry.get("overrides", ())),
                            init_from_previous=bool(entry.get("init_from_previous", True)),
                            grow_factor=int(entry.get("grow_factor", 0))))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: stage names must be unique, got {names}")
    if stages[0].grow_factor > 1:
        raise ValueError(f"{path}: the first stage {names[0]!r} cannot grow a previous stage's checkpoint")
    return tuple(stages)


def validate_pipeline(name: str, overrides: Sequence[str] = ()) -> list:
    """Compose and validate every stage's configuration (recipe, ``overrides``, the stage's own
    overrides) without training; returns the typed ``RunConfig`` of each stage.

    Raises:
        ValueError: an unknown pipeline, or a stage whose configuration is bad (naming the stage).
    """
    from longcat.cli import compose_run_config

    configs = []
    for stage in load_pipeline(name):
        try:
            cfg, _ = compose_run_config(stage.recipe, [*overrides, *stage.overrides])
            cfg.validate(dp=1 if cfg.parallel.dp in (-1, 1) else cfg.parallel.dp)
        except ValueError as exc:
            raise ValueError(f"pipeline {name!r}, stage {stage.name!r}: {exc}") from None
        configs.append(cfg)
    return configs


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
    chain = load_pipeline(name)
    names = [s.name for s in chain]
    if stages:
        unknown = sorted(set(stages) - set(names))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown} of pipeline {name!r}; stages are {names}")
    validate_pipeline(name, overrides)  # every stage's configuration, before any work starts
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
