"""``longcat-train`` / ``python -m longcat.train``: the command line (argument handling only).

    longcat-train [recipe=<name>] [key=value ...] [--cfg | --validate] [--world-size N] [--help]

``<name>`` is a file of ``recipes/`` (default ``pretrain``: the tiny CPU pre-training run) or a path to a
YAML recipe. Overrides use Hydra syntax: ``model=small``, ``train.steps=50``, ``optim.lr=1e-3``.
The configuration is composed (``longcat.config.compose``) and validated (``longcat.config.validate``)
before anything else: ``--cfg`` prints it, ``--validate`` prints nothing but the errors; both check it
for the world size of ``--world-size N``, else ``WORLD_SIZE`` (torchrun's), else 1. Exit codes: 0, or 2
with one ``error: ...`` line per problem. Launched by ``torchrun``, each process then trains
(``longcat.launch``); library code never sees Hydra or a DictConfig.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

from longcat.config.compose import available_recipes, compose_run_config, project_root
from longcat.config.validate import ConfigError, validate, world_size_from_env

if TYPE_CHECKING:
    from longcat.train.callbacks import Callback

logger = logging.getLogger("longcat")

DEFAULT_RECIPE = "pretrain"
FLAGS = ("--cfg", "--validate", "--world-size", "--help")


class Args(NamedTuple):
    recipe: str
    overrides: list[str]
    flags: set[str]
    world_size: Optional[int]  # --world-size N


def _parse_args(argv: Sequence[str]) -> Args:
    """Split ``argv`` into the recipe, Hydra overrides and flags.

    Raises:
        ValueError: an unknown flag, or ``--world-size`` without a positive integer.
    """
    recipe, overrides, flags, world_size = DEFAULT_RECIPE, [], set(), None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-h":
            arg = "--help"
        if not arg.startswith("--"):
            if arg.startswith("recipe="):
                recipe = arg.split("=", 1)[1]
            else:
                overrides.append(arg)
            continue
        flag, has_value, value = arg.partition("=")
        if flag not in FLAGS:
            raise ValueError(f"unknown flag {flag}; the flags are {', '.join(FLAGS)} (see longcat-train --help)")
        if flag == "--world-size":
            value = value if has_value else (args.pop(0) if args else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--world-size {value!r}: give the number of processes, e.g. --world-size 8")
            world_size = int(value)
        flags.add(flag)
    return Args(recipe, overrides, flags, world_size)


def _print_errors(exc: Exception, *, prefix: str = "") -> None:
    for line in getattr(exc, "errors", None) or [str(exc)]:
        print(f"error: {prefix}{line}", file=sys.stderr, flush=True)


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
        "flags: --cfg prints the resolved, validated config and exits; --validate prints only errors (exit 0 when "
        "valid, 2 otherwise); --world-size N checks either for N processes; --help prints this.",
    ]
    print("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code. ``callbacks``: extra
    callbacks for the trainer (the reliability tests' fault injection, ``longcat.testing.fault_train``)."""
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        _print_errors(exc)
        return 2
    if "--help" in args.flags:
        _print_help()
        return 0
    checking = args.flags & {"--cfg", "--validate"}
    if args.world_size is not None and not checking:
        _print_errors(ValueError("--world-size goes with --cfg or --validate; a run takes its world size from "
                                 "torchrun (WORLD_SIZE)"))
        return 2
    try:
        run_cfg, cfg_dict = compose_run_config(args.recipe, args.overrides)
        if checking:
            validate(run_cfg, world_size=args.world_size or world_size_from_env())
    except ConfigError as exc:
        if args.world_size is None and "WORLD_SIZE" not in os.environ:  # say where world_size=1 came from
            exc = ConfigError([f"{e} (world_size=1: no --world-size N and no WORLD_SIZE)" if "world_size=" in e else e
                               for e in exc.errors])
        _print_errors(exc)
        return 2
    except ValueError as exc:
        _print_errors(exc)
        return 2
    if "--cfg" in args.flags:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg_dict))
    if checking:
        return 0
    from longcat.launch import run_training
    from longcat.train.checkpoint_io import CheckpointWriteError

    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    prefix = f"rank {rank}: " if world_size_from_env() > 1 else ""
    try:
        return run_training(run_cfg, cfg_dict, callbacks=callbacks)
    except ValueError as exc:
        _print_errors(exc, prefix=prefix)
        return 2
    except CheckpointWriteError as exc:  # e.g. a full disk: the previous checkpoint is intact
        _print_errors(exc, prefix=prefix)
        return 1
    except Exception as exc:  # anything else: its traceback, then one error line; exiting lets torchrun
        traceback.print_exc()  # stop the other ranks (run_training waits on no peer after a failure)
        _print_errors(RuntimeError(f"{type(exc).__name__}: {exc}"), prefix=prefix)
        return 1
