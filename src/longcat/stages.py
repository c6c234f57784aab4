"""Multi-stage runs: the LongCat-Flash training pipeline and model growth, as chains of recipes.

arXiv 2509.01322 §3 trains in stages, each starting from the previous stage's final checkpoint:
pre-training -> mid-training -> long-context extension -> agentic SFT. A new stage loads only the
weights (``train.init_from=``): a fresh optimizer, LR schedule and data position, as its recipe says.
``pretrain_growth`` trains a half-depth model, stacks it twice (§3.1.2, ``tools/grow_model.py``) and
continues with the full depth, keeping the training state.

Pipelines are recipes too: ``recipes/pipelines/<name>.yaml`` lists the stages (name, recipe, the
stage's own overrides, whether it loads the previous stage's weights or grows its checkpoint).

Each stage runs as its own ``python -m longcat.train`` process, or with ``nproc: N`` in the pipeline
file as N processes on this machine under torchrun (the long-context stage runs context parallelism,
cp=2, on 2), writing to ``<out_root>/<stage>/``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

from longcat.config.compose import compose_run_config, project_root
from longcat.config.validate import validate as validate_run_config
from longcat.config.validate import world_size_from_env
from longcat.plots import read_metrics
from longcat.train.checkpoint import latest_checkpoint, list_checkpoints

if TYPE_CHECKING:
    from longcat.config.schema import RunConfig


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    init_from_previous: bool = True  # weights only, from the previous stage's final checkpoint
    grow_factor: int = 0  # > 1: grow the previous stage's checkpoint and resume from it (full state)
    nproc: int = 1  # processes on this machine (> 1: launched with torchrun --standalone)


PIPELINE_DIR = "recipes/pipelines"  # one YAML file per pipeline: a header comment and a `stages:` list
_STAGE_KEYS = {"name", "recipe", "overrides", "init_from_previous", "grow_factor", "nproc"}


def _pipeline_dir() -> Path:

    return project_root() / PIPELINE_DIR


def available_pipelines() -> list[str]:
    """Names of the pipeline recipes (``recipes/pipelines/<name>.yaml``)."""
    return sorted(p.stem for p in _pipeline_dir().glob("*.yaml"))


def load_pipeline(name: str) -> tuple[Stage, ...]:
    """The stages of pipeline recipe ``name`` (or of the YAML file at that path), in order.

    Raises:
        ValueError: an unknown pipeline, or a malformed file (naming the stage and key).
    """
    import yaml

    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else _pipeline_dir() / f"{name}.yaml"
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
            raise ValueError(f"{path}: stage {entry['name']!r} has unknown key(s) {unknown}; "
                             f"allowed: {sorted(_STAGE_KEYS)}")
        stages.append(Stage(name=str(entry["name"]), recipe=str(entry["recipe"]),
                            overrides=tuple(str(o) for o in entry.get("overrides", ())),
                            init_from_previous=bool(entry.get("init_from_previous", True)),
                            grow_factor=int(entry.get("grow_factor", 0)), nproc=int(entry.get("nproc", 1))))
        if stages[-1].nproc < 1:
            raise ValueError(f"{path}: stage {entry['name']!r} has nproc={stages[-1].nproc}; use 1 or more processes")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: stage names must be unique, got {names}")
    if stages[0].grow_factor > 1:
        raise ValueError(f"{path}: the first stage {names[0]!r} cannot grow a previous stage's checkpoint")
    return tuple(stages)


PIPELINE_OWNED_KEYS = {
    "train.out_dir": "each stage writes to <--out>/<stage>; choose the root with --out",
    "train.init_from": "each stage starts from the previous stage's final checkpoint",
}


def override_key(override: str) -> str:
    """The dotted key of a Hydra override (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def check_overrides(name: str, overrides: Sequence[str]) -> None:
    """Refuse user overrides that the pipeline or one of its stages sets itself (they would be
    silently replaced).

    Raises:
        ValueError: naming the override, the stage that sets it, and what to do instead.
    """
    for override in overrides:
        key = override_key(override)
        if key in PIPELINE_OWNED_KEYS:
            raise ValueError(f"{override!r}: the pipeline sets {key} itself ({PIPELINE_OWNED_KEYS[key]})")
        for stage in load_pipeline(name):
            owned = {override_key(o): o for o in stage.overrides}
            if key in owned:
                where = name if Path(name).suffix in (".yaml", ".yml") else f"a copy of {PIPELINE_DIR}/{name}.yaml"
                raise ValueError(f"{override!r}: stage {stage.name!r} of pipeline {name!r} sets {owned[key]!r} "
                                 f"itself, so the override would be ignored there; change it in {where} "
                                 f"and pass --pipeline <that file>")


def validate_pipeline(name: str, overrides: Sequence[str] = ()) -> list[RunConfig]:
    """Compose and validate every stage's configuration (recipe, ``overrides``, the stage's own
    overrides) without training; returns the typed ``RunConfig`` of each stage.

    Raises:
        ValueError: an unknown pipeline, an override a stage sets itself, a stage whose configuration
            is bad, or a growth stage whose schedule does not go past the stage it grows (naming it).
    """

    check_overrides(name, overrides)
    configs: list[RunConfig] = []
    for stage in load_pipeline(name):
        try:
            cfg, _ = compose_run_config(stage.recipe, [*overrides, *stage.overrides])
            # each stage is a `python -m longcat.train` process, or nproc of them under torchrun
            validate_run_config(cfg, world_size=stage.nproc if stage.nproc > 1 else world_size_from_env())
        except ValueError as exc:
            raise ValueError(f"pipeline {name!r}, stage {stage.name!r}: {exc}") from None
        if stage.grow_factor > 1 and configs and cfg.train.steps <= configs[-1].train.steps:
            raise ValueError(
                f"pipeline {name!r}, stage {stage.name!r}: it continues the grown checkpoint of step "
                f"{configs[-1].train.steps} but train.steps={cfg.train.steps}, so it would train nothing; "
                f"give it more steps than the stage before")
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


def _val_losses(metrics: Path) -> list[float]:
    records = read_metrics(metrics) if metrics.is_file() else []
    return [float(r["val/loss"]) for r in records if isinstance(r.get("val/loss"), (int, float))]


class PlannedStage(NamedTuple):
    stage: Stage
    args: list[str]  # longcat-train arguments; train.init_from is added when the previous stage ends
    out_dir: Path
    previous_dir: Optional[Path]  # the previous stage's folder (None for the first stage)
    steps: int  # the stage's train.steps: its final checkpoint must be of this step


def plan_pipeline(name: str, *, out_root: Path, overrides: Sequence[str] = (),
                  stages: Optional[Sequence[str]] = None) -> list[PlannedStage]:
    """Validate everything a run needs before its first stage starts; return the stages to run.

    Raises:
        ValueError: unknown pipeline or stage names, bad overrides or stage configurations, or a
            selected stage whose predecessor (not selected) has no checkpoint to start from.
    """
    chain = load_pipeline(name)
    names = [s.name for s in chain]
    unknown = sorted(set(stages or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} of pipeline {name!r}; stages are {names}")
    configs = validate_pipeline(name, overrides)
    selected = set(stages or names)
    planned = []
    for i, (stage, cfg) in enumerate(zip(chain, configs)):
        if stage.name not in selected:
            continue
        out_dir = Path(out_root) / stage.name
        previous_dir = Path(out_root) / chain[i - 1].name if i > 0 else None
        needs_previous = stage.grow_factor > 1 or stage.init_from_previous
        if (needs_previous and previous_dir is not None and chain[i - 1].name not in selected
                and latest_checkpoint(previous_dir / "checkpoints") is None):
            raise ValueError(
                f"stage {stage.name!r} starts from stage {chain[i - 1].name!r}'s final checkpoint, but "
                f"{previous_dir / 'checkpoints'} has none: run that stage too (add it to --stages) or check --out")
        args = [f"recipe={stage.recipe}", f"train.out_dir={out_dir}", *overrides, *stage.overrides]
        planned.append(PlannedStage(stage, args, out_dir, previous_dir, cfg.train.steps))
    return planned


def run_pipeline(name: str, *, out_root: Path, overrides: Sequence[str] = (), python: str = sys.executable,
                 stages: Optional[Sequence[str]] = None) -> list[StageResult]:
    """Run the named pipeline's stages in order; returns one result per stage.

    A stage whose folder already holds checkpoints resumes from its own latest one (its
    ``train.init_from`` only seeds a fresh stage): rerunning an interrupted pipeline continues it.

    Args:
        overrides: Hydra overrides added to every stage (e.g. ``logging.wandb.mode=disabled``); keys
            the pipeline or a stage sets itself are refused.
        stages: run only these stage names (their predecessors' checkpoints must exist).
    Raises:
        ValueError: see ``plan_pipeline`` (raised before any stage runs).
        RuntimeError: a stage's process failed, or a stage ended without a checkpoint.
    """
    results: list[StageResult] = []
    for stage, args, out_dir, previous_dir, steps in plan_pipeline(name, out_root=out_root, overrides=overrides,
                                                                   stages=stages):
        previous = latest_checkpoint(previous_dir / "checkpoints") if previous_dir is not None else None
        own = latest_checkpoint(out_dir / "checkpoints")
        if own is not None:
            print(f"== stage {stage.name}: resuming from its own checkpoint {own} (delete {out_dir} to start "
                  f"the stage again from the previous stage's weights)", flush=True)
        elif stage.grow_factor > 1:
            subprocess.run([python, str(Path(__file__).resolve().parents[2] / "tools" / "grow_model.py"),
                            "--checkpoint", str(previous), "--output", str(out_dir),
                            "--factor", str(stage.grow_factor)], check=True)
        elif stage.init_from_previous and previous is not None:
            args = [*args, f"train.init_from={previous}"]
        start = time.perf_counter()
        launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stage.nproc}"] \
            if stage.nproc > 1 else [python]
        how = f"torchrun --nproc-per-node {stage.nproc} " if stage.nproc > 1 else ""
        print(f"== stage {stage.name}: {how}longcat-train {' '.join(args)}", flush=True)
        proc = subprocess.run([*launcher, "-m", "longcat.train", *args])
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage.name!r} failed with exit code {proc.returncode}; see its output above")
        saved = list_checkpoints(out_dir / "checkpoints")
        final = saved[-1][1] if saved else None
        if not saved or saved[-1][0] != steps:
            raise RuntimeError(
                f"stage {stage.name!r} ended without its final checkpoint (step {steps}) in {out_dir / 'checkpoints'} "
                f"(latest: {final}); it was stopped early (e.g. preempted): rerun the pipeline to continue it")
        vals = _val_losses(out_dir / "metrics.jsonl")
        results.append(StageResult(name=stage.name, out_dir=str(out_dir), final_checkpoint=str(final),
                                   initial_val_loss=vals[0] if vals else None,
                                   final_val_loss=vals[-1] if vals else None,
                                   wall_s=time.perf_counter() - start))
    return results
