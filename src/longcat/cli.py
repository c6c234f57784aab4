"""``longcat-train`` / ``python -m longcat.train``: the command line (argument handling only).

    longcat-train [recipe=<name>] [key=value ...] [--cfg] [--help]

``<name>`` is a file of ``recipes/`` (default ``pretrain``: the tiny CPU pre-training run) or a path to a
YAML recipe. Overrides use Hydra syntax: ``model=small``, ``train.steps=50``, ``optim.lr=1e-3``.
The configuration is composed by ``longcat.config.compose`` (the config layer). Launched by
``torchrun``, each process builds its ``ProcessGroups`` from ``parallel.*`` and passes them down;
library code never sees Hydra or a DictConfig.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

from omegaconf import OmegaConf

from longcat.config.compose import available_recipes, compose_run_config, project_root

logger = logging.getLogger("longcat")

DEFAULT_RECIPE = "pretrain"


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


def main(argv: Optional[Sequence[str]] = None) -> int:
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
        return run_training(run_cfg, cfg_dict)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:  # e.g. a full disk: the previous checkpoint is intact
        print(f"error: {exc}", file=sys.stderr)
        return 1
