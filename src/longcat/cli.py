"""``longcat-train`` / ``python -m longcat.train``: the Hydra entry point (Hydra stops here).

    longcat-train [recipe=<name>] [key=value ...] [--cfg] [--help]

``<name>`` is a file of ``recipes/`` (default ``pretrain``: the tiny CPU pre-training run) or a path to a
YAML recipe. Overrides use Hydra syntax: ``model=small``, ``train.steps=50``, ``optim.lr=1e-3``.
Launched by ``torchrun``, each process builds its ``ProcessGroups`` from ``parallel.*`` here and
passes them down; library code never sees Hydra or a DictConfig.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from omegaconf import OmegaConf

from longcat.config.schema import RunConfig

if TYPE_CHECKING:
    from longcat.train.callbacks import Callback

logger = logging.getLogger("longcat")

DEFAULT_RECIPE = "pretrain"
SCHEMA_NAME = "longcat_run_schema"  # recipes list it first in their defaults: every key is typed


def register_schema() -> None:
    """Register ``RunConfig`` in Hydra's ConfigStore so a recipe's typos fail at compose time."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


def project_root() -> Path:
    """The folder holding ``recipes/`` and ``conf/`` (``LONGCAT_HOME`` overrides)."""
    env = os.environ.get("LONGCAT_HOME")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (project_root() / "recipes").glob("*.yaml"))


def _split_args(argv: Sequence[str]) -> tuple[str, list[str], set[str]]:
    recipe, overrides, flags = DEFAULT_RECIPE, [], set()
    for arg in argv:
        if arg.startswith("--"):
            flags.add(arg)
        elif arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return recipe, overrides, flags


def compose_run_config(recipe: str, overrides: Sequence[str] = ()) -> tuple[RunConfig, dict]:
    """Compose ``recipe`` with ``overrides`` against the typed schema.

    Returns the typed ``RunConfig`` and the same as a plain dict (for checkpoints and wandb).
    Raises:
        ValueError: unknown recipe, unknown key, or a value of the wrong type, naming it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    root = project_root()
    recipe_path = Path(recipe)
    if recipe_path.suffix in (".yaml", ".yml") and recipe_path.is_file():
        recipe_dir, recipe_name = recipe_path.resolve().parent, recipe_path.stem
    else:
        recipe_dir, recipe_name = root / "recipes", recipe
        if not (recipe_dir / f"{recipe}.yaml").is_file():
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {available_recipes()} "
                             f"or pass a path to a .yaml file")
    GlobalHydra.instance().clear()
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(recipe_dir), version_base=None):
            composed = compose(config_name=recipe_name,
                               overrides=[*overrides, f"hydra.searchpath=[file://{root / 'conf'}]"])
        # Merge a plain copy: the composed nodes carry the schema's types and would take keys that
        # Hydra's `+key=value` appended; a plain dict against the schema rejects any unknown key.
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(composed, resolve=False))
        run_cfg: RunConfig = OmegaConf.to_object(merged)
    except Exception as exc:  # Hydra/OmegaConf errors: re-raise as one clear message
        detail = str(exc)
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause) and str(cause) not in detail:  # e.g. the allowed enum values
            detail = f"{detail}: {cause}"
        raise ValueError(f"bad configuration for recipe {recipe!r}: {detail}".strip()) from None
    finally:
        GlobalHydra.instance().clear()
    return run_cfg, OmegaConf.to_container(merged, resolve=True, enum_to_str=True)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _print_help() -> None:
    root = project_root()
    groups = sorted(p.name for p in (root / "conf").iterdir() if p.is_dir()) if (root / "conf").is_dir() else []
    lines = [
        __doc__.strip(), "",
        f"recipes ({root / 'recipes'}): {', '.join(available_recipes())}",
        "config groups: " + ", ".join(f"{g}=[{', '.join(sorted(p.stem for p in (root / 'conf' / g).glob('*.yaml')))}]"
                                      for g in groups),
        "flags: --cfg prints the resolved config and exits; --help prints this.",
    ]
    print("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code. ``callbacks``: extra
    callbacks for the trainer (the reliability tests' fault injection, ``longcat.testing.fault_train``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe, overrides, flags = _split_args(argv)
    if "--help" in flags or "-h" in argv:
        _print_help()
        return 0
    unknown = flags - {"--cfg", "--help"}
    if unknown:
        print(f"error: unknown flag(s) {sorted(unknown)}; see longcat-train --help", file=sys.stderr)
        return 2
    try:
        run_cfg, cfg_dict = compose_run_config(recipe, overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "--cfg" in flags:
        print(OmegaConf.to_yaml(cfg_dict))
        return 0
    from longcat.launch import run_training

    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    from longcat.train.checkpoint_io import CheckpointWriteError

    try:
        return run_training(run_cfg, cfg_dict, callbacks=callbacks)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:  # e.g. a full disk: the previous checkpoint is intact
        print(f"error: {exc}", file=sys.stderr)
        return 1
