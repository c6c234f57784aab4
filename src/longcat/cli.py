"""``longcat-train`` / ``python -m longcat.train``: the command line, a Hydra app on the typed schema.

    longcat-train [recipe=<name>] [key=value ...] [--validate] [--world-size N] [Hydra flags]

``<name>`` is a file of ``recipes/`` (default ``pretrain``: the tiny CPU pre-training run) or a path to a
YAML recipe (Hydra's ``--config-name`` / ``--config-dir`` / ``--config-path`` work as well). Overrides use
Hydra syntax: ``model=small``, ``train.steps=50``, ``optim.lr=1e-3``, ``~logging`` (drop a group's choice).

The run is Hydra's own (``hydra._internal.utils._run_hydra``, what ``@hydra.main`` calls): ``-m`` /
``--multirun`` sweeps with the basic launcher, ``--cfg job|hydra|all`` (a bare ``--cfg`` is ``--cfg job``),
``--info [all|config|defaults|defaults-tree|plugins|searchpath]`` (a bare ``--info`` is ``--info all``),
``--resolve``, ``-p``, ``--hydra-help``, ``-sc install=bash`` (shell completion), each with or without
overrides, before or after them. The run folder holds ``.hydra/config.yaml``, ``hydra.yaml`` and
``overrides.yaml``. The job's folder is ``train.out_dir``: ``hydra.run.dir`` defaults to it (set either
one); a sweep's folder, ``hydra.sweep.dir``, defaults to ``train.out_dir`` and each job trains in
``<sweep dir>/<job number>``.

Before Hydra runs anything, every job's configuration is composed (``longcat.config.compose``) and
validated (``longcat.config.validate``): ``--cfg`` prints only a valid config, ``--validate`` prints
nothing but the errors; both check it for the world size of ``--world-size N``, else ``WORLD_SIZE``
(torchrun's), else 1. Exit codes: 0, or 2 with one ``error: ...`` line per problem (others: see
``docs/reliability.md``). Launched by ``torchrun``, each process then trains (``longcat.launch``); library
code never sees Hydra or a DictConfig.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

from longcat.config.compose import (
    available_recipes,
    compose_job,
    config_groups,
    project_root,
    recipe_location,
    register_schema,
    register_search_path,
    to_run_config,
)
from longcat.config.schema import RunConfig
from longcat.config.validate import ConfigError, validate, world_size_from_env

if TYPE_CHECKING:
    from longcat.train.callbacks import Callback

logger = logging.getLogger("longcat")

DEFAULT_RECIPE = "pretrain"
OWN_FLAGS = ("--validate", "--world-size", "--help")
CFG_TYPES = ("job", "hydra", "all")
INFO_KINDS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
# Hydra flags whose value may be left out, with the value a bare one means. Spelled out here, a bare one
# cannot take the next argument (an override, or the Hydra settings the wrapper adds) as its value.
OPTIONAL_VALUES = {"--cfg": ("job", CFG_TYPES), "-c": ("job", CFG_TYPES), "--info": ("all", INFO_KINDS),
                   "-i": ("all", INFO_KINDS)}
# Hydra settings of every run, each unless the command line sets it: the job's folder is train.out_dir,
# logging stays ours (rank prefix), paths in the config stay relative to the launch folder.
HYDRA_DEFAULTS = {
    "hydra.run.dir": "${train.out_dir}",
    "hydra.sweep.dir": "${train.out_dir}",
    "hydra.job.chdir": "false",
    "hydra/job_logging": "none",
    "hydra/hydra_logging": "none",
    "hydra.job.name": "longcat_train",
}


class Args(NamedTuple):
    recipe: str
    config_dir: Optional[str]  # Hydra's --config-dir
    overrides: list[str]
    hydra_flags: list[str]  # passed to Hydra's own parser (-m, --cfg job, --info, -sc, ...)
    validate: bool
    help: bool
    world_size: Optional[int]  # --world-size N
    cfg: Optional[str]  # --cfg TYPE
    multirun: bool
    command: str  # what Hydra is asked to do: run, multirun, cfg, info, shell_completion, hydra_help, version


def _parse_args(argv: Sequence[str]) -> Args:
    """Split ``argv`` into our flags and Hydra's (parsed with Hydra's own parser).

    Raises:
        ValueError: an unknown flag, ``--world-size`` without a positive integer, a recipe given twice.
    """
    from hydra._internal.utils import get_args_parser

    recipe: Optional[str] = None
    rest, validate_only, want_help, world_size = [], False, False, None
    args = list(argv)
    while args:
        arg = args.pop(0)
        flag, has_value, value = arg.partition("=")
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--validate":
            validate_only = True
        elif flag == "--world-size":
            value = value if has_value else (args.pop(0) if args else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--world-size {value!r}: give the number of processes, e.g. --world-size 8")
            world_size = int(value)
        elif arg in OPTIONAL_VALUES and not (args and args[0] in OPTIONAL_VALUES[arg][1]):
            default, choices = OPTIONAL_VALUES[arg]
            if args and not args[0].startswith(("-", "~")) and "=" not in args[0]:
                raise ValueError(f"{arg} {args[0]}: expected one of {', '.join(choices)} (a bare {arg} is "
                                 f"{arg} {default})")
            rest += [arg, default]
        elif arg.startswith("recipe="):
            recipe = value
        else:
            rest.append(arg)
    parser = get_args_parser()
    try:
        parsed, unknown = parser.parse_known_intermixed_args(rest)
    except SystemExit as exc:  # argparse printed its message (e.g. --cfg with a wrong type)
        if not exc.code:  # --version printed Hydra's version
            raise
        raise ValueError(f"bad Hydra flags {' '.join(rest)} (see longcat-train --hydra-help)") from exc
    if unknown:
        flags = [*OWN_FLAGS, "--cfg", "-m/--multirun", "--info", "--config-name", "--config-dir", "--config-path",
                 "--resolve", "-sc", "--hydra-help"]
        raise ValueError(f"unknown flag {unknown[0]}; the flags are {', '.join(flags)} (see longcat-train --help)")
    if parsed.config_path is not None or parsed.config_name is not None:
        if recipe is not None:
            raise ValueError(f"recipe={recipe} and --config-name/--config-path both choose the recipe; give one")
        name = parsed.config_name or DEFAULT_RECIPE
        recipe = str(Path(parsed.config_path) / f"{name}.yaml") if parsed.config_path is not None else name
    hydra_flags = [a for a in rest if a not in parsed.overrides]
    commands = [name for name, given in (
        ("multirun", parsed.multirun), ("cfg", parsed.cfg is not None), ("info", parsed.info is not None),
        ("shell_completion", parsed.shell_completion), ("hydra_help", parsed.hydra_help)) if given]
    exclusive = {"multirun": "-m/--multirun", "cfg": "--cfg", "info": "--info", "shell_completion": "-sc"}
    clashing = [exclusive[name] for name in commands if name in exclusive]
    if len(clashing) > 1:  # Hydra would raise a ValueError with a traceback
        raise ValueError(f"{' and '.join(clashing)} cannot be combined: give one of them (e.g. --cfg job to print "
                         "one job's config, or -m alone to run the sweep)")
    command = commands[0] if commands else "run"
    return Args(recipe or DEFAULT_RECIPE, parsed.config_dir, list(parsed.overrides), hydra_flags, validate_only,
                want_help, world_size, parsed.cfg, bool(parsed.multirun), command)


def _print_errors(exc: Exception, *, prefix: str = "") -> None:
    for line in getattr(exc, "errors", None) or [str(exc)]:
        print(f"error: {prefix}{line}", file=sys.stderr, flush=True)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _print_help() -> None:
    root = project_root()
    lines = [
        __doc__.strip().replace("``", ""), "",  # the module doc is RST; the terminal shows plain text
        f"recipes ({root / 'recipes'}): {', '.join(available_recipes())}",
        "config groups: " + ", ".join(f"{g}=[{', '.join(sorted(p.stem for p in (root / 'conf' / g).glob('*.yaml')))}]"
                                      for g in config_groups()),
        "flags: --validate prints only errors (exit 0 when valid, 2 otherwise); --world-size N checks --cfg or "
        "--validate for N processes; --cfg [job|hydra|all] prints the resolved, validated config and exits; "
        "-m/--multirun sweeps (a=1,2 b=x,y: one job each, in <train.out_dir>/<job number>); --info [KIND] "
        f"(Hydra's view of the run: {'|'.join(INFO_KINDS)}; bare: all); "
        "--config-name/--config-dir/--config-path; -sc install=bash (shell completion); --hydra-help; --help.",
    ]
    print("\n".join(lines))


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _under_torchrun() -> bool:
    return world_size_from_env() > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def _job_overrides(args: Args) -> list[list[str]]:
    """Every job's overrides: one list for a run, the basic sweeper's expansion for ``-m``.

    Raises:
        ValueError: an override Hydra cannot parse, or a sweep kind the basic sweeper does not do.
    """
    if not args.multirun:
        return [args.overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]
    except Exception as exc:
        raise ValueError(f"cannot expand the sweep {' '.join(args.overrides)}: {exc}") from None


def _check_hydra_overrides(args: Args) -> None:
    """Refuse the Hydra settings that would break a run, with the fix."""
    given = {_override_key(o): o for o in args.overrides}
    if "hydra.job.chdir" in given and given["hydra.job.chdir"].split("=", 1)[1].lower() == "true":
        raise ValueError("hydra.job.chdir=true is not supported: paths in the config (data, tokenizer, "
                         "train.init_from) are relative to the launch folder; leave it false")
    if "hydra.run.dir" in given and "train.out_dir" in given:
        raise ValueError(f"{given['hydra.run.dir']} and {given['train.out_dir']} both set the run's folder "
                         f"(hydra.run.dir is train.out_dir); give one of them")
    if args.multirun and _under_torchrun():
        raise ValueError("--multirun under torchrun: every rank would run the whole sweep. Launch one torchrun "
                         "per job instead (torchrun ... -m longcat.train optim.lr=1e-3 ...), or sweep in one "
                         "process (longcat-train -m ...)")


def _with_hydra_defaults(overrides: Sequence[str], *, rank: int) -> list[str]:
    keys = {_override_key(o) for o in overrides}
    extra = [f"{key}={value}" for key, value in HYDRA_DEFAULTS.items() if key not in keys]
    if rank != 0 and "hydra.output_subdir" not in keys:
        extra.append("hydra.output_subdir=null")  # one rank writes .hydra/ into the shared folder
    return [*extra, *overrides]


def _train(run_cfg: RunConfig, cfg_dict: dict, *, callbacks: Sequence[Callback], job: str = "") -> int:
    """One job: ``launch.run_training``; returns the exit code, printing one ``error:`` line on failure
    (after ``job``, a sweep job's name, when given)."""
    from longcat.launch import run_training
    from longcat.train.checkpoint_io import CheckpointWriteError

    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    prefix = job + (f"rank {rank}: " if world_size_from_env() > 1 else "")
    try:
        return run_training(run_cfg, cfg_dict, callbacks=callbacks)
    except ValueError as exc:
        if not _raised_by_longcat(exc):  # not one of our checks: a library's, show where it came from
            traceback.print_exc()
        _print_errors(exc, prefix=prefix)
        return 2
    except CheckpointWriteError as exc:  # e.g. a full disk: the previous checkpoint is intact
        _print_errors(exc, prefix=prefix)
        return 1
    except Exception as exc:  # anything else: its traceback, then one error line; exiting lets torchrun
        traceback.print_exc()  # stop the other ranks (run_training waits on no peer after a failure)
        _print_errors(RuntimeError(f"{type(exc).__name__}: {exc}"), prefix=prefix)
        return 1


def _raised_by_longcat(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is longcat's own code (a deliberate check with
    its message) rather than a library's (an unexpected failure, shown with its traceback)."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "").split(".")[0] == "longcat"


class _Task:
    """Hydra's task function: the composed job config -> ``RunConfig`` in the job's folder -> a run."""

    def __init__(self, *, multirun: bool, swept: set[str], callbacks: Sequence[Callback], new_dirs: set[str]):
        self.multirun, self.swept, self.callbacks, self.new_dirs = multirun, swept, callbacks, new_dirs
        self.codes: list[int] = []
        self.failed: list[str] = []  # the sweep's failed jobs: "job N (overrides) exit C in <folder>"
        self.stopped_in: Optional[int] = None  # the sweep job a SIGTERM / Ctrl-C stopped

    def __call__(self, cfg: Any) -> int:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        out_dir = hydra_cfg.runtime.output_dir if self.multirun else str(hydra_cfg.run.dir)
        run_cfg, cfg_dict = to_run_config(cfg)
        run_cfg.train.out_dir = cfg_dict["train"]["out_dir"] = out_dir
        if hydra_cfg.output_subdir is not None and cfg.train.out_dir != out_dir:
            _save_job_config(cfg, out_dir=out_dir, path=Path(out_dir) / str(hydra_cfg.output_subdir) / "config.yaml")
        name = ""  # a sweep job's, for its error lines
        if self.multirun:
            swept = " ".join(o for o in hydra_cfg.overrides.task if _override_key(o) in self.swept)
            if self.stopped_in is not None:  # Hydra's launcher has no stop: pass over the remaining jobs
                print(f"== job {hydra_cfg.job.num} skipped: the sweep was stopped in job {self.stopped_in}; "
                      "rerun the same command to continue it (each job resumes)", flush=True)
                return 0
            print(f"== job {hydra_cfg.job.num}: {swept} -> {out_dir}", flush=True)
            name = f"job {hydra_cfg.job.num} ({swept})"
        code = _train(run_cfg, cfg_dict, callbacks=self.callbacks, job=f"{name}: " if name else "")
        if code != 0 and name:
            self.failed.append(f"{name} exit {code} in {out_dir}")
        if self.multirun and code == 0 and _stopped_early(Path(out_dir), steps=run_cfg.train.steps):
            self.stopped_in = int(hydra_cfg.job.num)  # SIGTERM / Ctrl-C: checkpointed, stop the sweep too
        if code == 2 and out_dir in self.new_dirs:  # bad input: leave no folder behind, not even .hydra/
            shutil.rmtree(Path(out_dir) / str(hydra_cfg.output_subdir or ".hydra"), ignore_errors=True)
            _remove_if_empty(Path(out_dir))
        self.codes.append(code)
        return code


def _save_job_config(cfg: Any, *, out_dir: str, path: Path) -> None:
    """Rewrite the job's ``.hydra/config.yaml`` (which Hydra saves before the job starts) with the folder
    the job runs in as ``train.out_dir``: a sweep job's ``<sweep dir>/<job number>``, or ``hydra.run.dir``."""
    from omegaconf import OmegaConf, read_write

    saved = copy.deepcopy(cfg)
    with read_write(saved):
        saved.train.out_dir = out_dir
    OmegaConf.save(saved, path)


def _stopped_early(out_dir: Path, *, steps: int) -> bool:
    """A run that returned 0 with its newest checkpoint short of ``steps`` was preempted (the stop always
    writes one)."""
    from longcat.train.checkpoint import list_checkpoints

    found = list_checkpoints(out_dir / "checkpoints")
    return bool(found) and found[-1][0] < steps


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _precheck(args: Args, *, rank: int) -> set[str]:
    """Compose and validate every job before Hydra runs one; for runs, also check their environment
    (``launch.preflight``). Returns the run folders that do not exist yet (removed again after bad input).

    Raises:
        ValueError / ConfigError: a job's problems, each naming the value and the fix.
    """
    checking = args.validate or args.cfg is not None
    new_dirs: set[str] = set()
    for overrides in _job_overrides(args):
        job = compose_job(args.recipe, _with_hydra_defaults(overrides, rank=rank), config_dir=args.config_dir)
        run_cfg = job.run_config
        validate(run_cfg, world_size=(args.world_size if checking else None) or world_size_from_env())
        if checking:
            continue
        out_dir = str(job.hydra["sweep.dir" if args.multirun else "run.dir"])
        run_cfg.train.out_dir = out_dir
        from longcat.launch import preflight  # imports torch: only for runs

        preflight(run_cfg)
        if not args.multirun and not Path(out_dir).exists():
            new_dirs.add(out_dir)
    return new_dirs


def _run_app(args: Args, *, rank: int, new_dirs: set[str], callbacks: Sequence[Callback]) -> int:
    """Hand the command to Hydra (``_run_hydra``, the body of ``@hydra.main``) with the recipe as the primary
    config; returns the exit code (a sweep's: the first failed job's, else 0)."""
    from hydra._internal.utils import _run_hydra, get_args_parser

    register_schema()
    register_search_path()
    recipe_dir, recipe_name = recipe_location(args.recipe, config_dir=args.config_dir)
    parser = get_args_parser()
    # Hydra's help composes no recipe (config_name=None): only overrides of Hydra's own settings apply
    overrides = [o for o in args.overrides if _override_key(o).startswith(("hydra.", "hydra/"))] \
        if args.command == "hydra_help" else args.overrides
    # the overrides first: no flag of Hydra's can take one of them (or a default added here) as its value
    hydra_args = parser.parse_args([*_with_hydra_defaults(overrides, rank=rank), *args.hydra_flags])
    hydra_args.config_path = hydra_args.config_name = None  # the recipe, resolved above
    jobs = _job_overrides(args)
    swept = {_override_key(o) for job in jobs for o in job if any(o not in other for other in jobs)}
    task = _Task(multirun=args.multirun, swept=swept, callbacks=callbacks, new_dirs={str(d) for d in new_dirs})
    try:
        _run_hydra(args=hydra_args, args_parser=parser, task_function=task, config_path=str(recipe_dir),
                   config_name=recipe_name)
    except SystemExit as exc:  # Hydra's --hydra-help, --version, or its report of an error (exit 1)
        return exc.code if isinstance(exc.code, int) else 1
    if task.failed:
        _print_errors(ValueError(f"{len(task.failed)} of {len(task.codes)} sweep jobs failed: "
                                 + "; ".join(task.failed)))
    return next((code for code in task.codes if code != 0), 0)


def main(argv: Optional[Sequence[str]] = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code. ``callbacks``: extra
    callbacks for the trainer (the reliability tests' fault injection, ``longcat.testing.fault_train``)."""
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        _print_errors(exc)
        return 2
    except SystemExit:  # Hydra's --version, printed
        return 0
    if args.help:
        _print_help()
        return 0
    checking = args.validate or args.cfg is not None
    if args.world_size is not None and not checking:
        _print_errors(ValueError("--world-size goes with --cfg or --validate; a run takes its world size from "
                                 "torchrun (WORLD_SIZE)"))
        return 2
    rank = int(os.environ.get("RANK", "0"))
    new_dirs: set[str] = set()
    if checking or args.command in ("run", "multirun"):
        prefix = f"rank {rank}: " if not checking and world_size_from_env() > 1 else ""
        try:
            _check_hydra_overrides(args)
            new_dirs = _precheck(args, rank=rank)
        except ConfigError as exc:
            if checking and args.world_size is None and "WORLD_SIZE" not in os.environ:  # where world_size=1 came from
                exc = ConfigError([f"{e} (world_size=1: no --world-size N and no WORLD_SIZE)" if "world_size=" in e
                                   else e for e in exc.errors])
            _print_errors(exc, prefix=prefix)
            return 2
        except ValueError as exc:
            _print_errors(exc, prefix=prefix)
            return 2
    elif args.command == "info":  # Hydra's --info composes the recipe too: report a bad override as --cfg does
        try:
            for overrides in _job_overrides(args):
                compose_job(args.recipe, _with_hydra_defaults(overrides, rank=rank), config_dir=args.config_dir)
        except ValueError as exc:
            _print_errors(exc)
            return 2
    if args.validate:
        return 0
    return _run_app(args, rank=rank, new_dirs=new_dirs, callbacks=callbacks)
