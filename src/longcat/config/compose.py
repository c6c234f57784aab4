"""Recipes composed into typed ``RunConfig`` objects (Hydra lives here and in the entry point only).

``compose_run_config(recipe, overrides)`` composes ``recipes/<recipe>.yaml`` with the ``conf/`` groups
and Hydra-syntax overrides against the schema (``longcat.config.schema``): an unknown key, a value of the
wrong type or a mode outside its enum fails here with one message naming the key, the allowed values, or
the closest key (``train.stepz`` -> ``did you mean train.steps?``). Range and layout checks are
``longcat.config.validate``'s. Library code (stages, benchmarks, sweeps, tests) composes through this
module, never through the CLI.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from omegaconf import OmegaConf, open_dict

from longcat.config.schema import RunConfig

__all__ = ["SCHEMA_NAME", "ComposedJob", "available_recipes", "compose_job", "compose_run_config", "project_root",
           "recipe_location", "register_schema", "register_search_path", "schema_keys", "to_run_config",
           "unknown_key_message"]

SCHEMA_NAME = "longcat_run_schema"  # recipes list it first in their defaults: every key is typed


def register_schema() -> None:
    """Register ``RunConfig`` in Hydra's ConfigStore so a recipe's typos fail at compose time."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


def register_search_path() -> None:
    """Add ``conf/`` (the config groups) to the search path of every Hydra app of this process, so that
    ``@hydra.main``-style runs (``longcat.cli``) find ``/model: tiny`` and the like wherever they start."""
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class LongcatConfGroups(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            search_path.append(provider="longcat", path=f"file://{project_root() / 'conf'}")

    LongcatConfGroups.__module__ = __name__  # Hydra names plugins by module.class
    Plugins.instance().register(LongcatConfGroups)


def project_root() -> Path:
    """The folder holding ``recipes/`` and ``conf/`` (``LONGCAT_HOME`` overrides)."""
    env = os.environ.get("LONGCAT_HOME")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[3]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (project_root() / "recipes").glob("*.yaml"))


def recipe_location(recipe: str, *, config_dir: Optional[str] = None) -> tuple[Path, str]:
    """Where ``recipe`` lives: ``(primary config folder, config name)``.

    Args:
        recipe: a name in ``recipes/`` (or in ``config_dir``) or a path to a ``.yaml`` file.
        config_dir: Hydra's ``--config-dir``, an extra folder searched first.

    Raises:
        ValueError: no such recipe (naming the recipes there are) or ``config_dir`` is not a folder.
    """
    if config_dir is not None and not Path(config_dir).is_dir():
        raise ValueError(f"--config-dir {config_dir}: no such folder; give the folder holding your recipe")
    recipe_path = Path(recipe)
    if recipe_path.suffix in (".yaml", ".yml") and recipe_path.is_file():
        return recipe_path.resolve().parent, recipe_path.stem
    if (project_root() / "recipes" / f"{recipe}.yaml").is_file():
        return project_root() / "recipes", recipe
    if config_dir is not None and (Path(config_dir) / f"{recipe}.yaml").is_file():
        return Path(config_dir).resolve(), recipe
    extra = sorted(p.stem for p in Path(config_dir).glob("*.yaml")) if config_dir else []
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted({*available_recipes(), *extra})} "
                     f"or pass a path to a .yaml file")


HYDRA_KEYS = ("run.dir", "sweep.dir", "job.chdir", "sweeper._target_", "launcher._target_")


class ComposedJob(NamedTuple):
    run_config: RunConfig
    config_dict: dict  # the same as a plain dict (modes as strings; for checkpoints and wandb)
    hydra: dict[str, Any]  # HYDRA_KEYS of Hydra's own node, resolved (None where it does not resolve here)


def _select_resolved(cfg: Any, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # e.g. ${hydra:...}, which only resolves inside a running Hydra job
        return None


def compose_job(recipe: str, overrides: Sequence[str] = (), *, config_dir: Optional[str] = None) -> ComposedJob:
    """Compose ``recipe`` with ``overrides`` against the typed schema, with Hydra's own node.

    Args:
        recipe: a name in ``recipes/`` (or ``config_dir``) or a path to a YAML recipe.
        overrides: Hydra overrides (``train.steps=50``, ``model=small``, ``+key=value``, ``~key``,
            ``hydra.run.dir=...``); no sweeps (expand them first).
        config_dir: Hydra's ``--config-dir`` (searched before ``recipes/`` and ``conf/``).

    Raises:
        ValueError: unknown recipe, unknown key (with the closest key), a value of the wrong type or a
            mode outside its enum (with the allowed values).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    recipe_dir, recipe_name = recipe_location(recipe, config_dir=config_dir)
    _refuse_key_deletions(overrides, config_dir=config_dir)
    search = [f"file://{Path(config_dir).resolve()}"] if config_dir else []
    search.append(f"file://{project_root() / 'conf'}")
    GlobalHydra.instance().clear()
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(recipe_dir), version_base=None):
            composed = compose(config_name=recipe_name, return_hydra_config=True,
                               overrides=[*overrides, f"hydra.searchpath=[{','.join(search)}]"])
        hydra_node = {key: _select_resolved(composed, f"hydra.{key}") for key in HYDRA_KEYS}
        with open_dict(composed):
            composed.pop("hydra")
        run_cfg, as_dict = to_run_config(composed)
    except Exception as exc:  # Hydra/OmegaConf errors: re-raise as one clear message
        raise ValueError(f"bad configuration for recipe {recipe!r}: {_explain(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
    return ComposedJob(run_cfg, as_dict, hydra_node)


def config_groups(*, config_dir: Optional[str] = None) -> list[str]:
    """The config groups (folders of ``conf/`` and of ``config_dir``): ``data``, ``logging``, ``model``, ..."""
    folders = [project_root() / "conf", *([Path(config_dir)] if config_dir else [])]
    return sorted({p.name for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_dir()})


def _refuse_key_deletions(overrides: Sequence[str], *, config_dir: Optional[str]) -> None:
    """``~GROUP`` (drop a config group's choice: the schema's defaults apply) and ``~hydra...`` are Hydra's;
    ``~key`` of the typed config would silently reset a recipe's section, or fail deep in OmegaConf."""
    groups = config_groups(config_dir=config_dir)
    for override in overrides:
        if not override.startswith("~"):
            continue
        key = override[1:].split("=", 1)[0]
        if key in groups or key.startswith("hydra"):
            continue
        raise ValueError(f"{override}: keys of the typed run config cannot be deleted (every key has a value); "
                         f"set it instead ({key}=...), or drop a config group's choice with ~GROUP "
                         f"(groups: {', '.join(groups)}), which leaves the schema's defaults")


def compose_run_config(recipe: str, overrides: Sequence[str] = (), *,
                       config_dir: Optional[str] = None) -> tuple[RunConfig, dict]:
    """Compose ``recipe`` with ``overrides`` against the typed schema.

    Args:
        recipe: a name in ``recipes/`` or a path to a YAML recipe.
        overrides: Hydra overrides (``train.steps=50``, ``model=small``, ``+key=value``).
        config_dir: an extra folder of recipes and config groups, searched first (Hydra's ``--config-dir``).

    Returns:
        The typed ``RunConfig`` and the same as a plain dict (modes as strings; for checkpoints and wandb).

    Raises:
        ValueError: unknown recipe, unknown key (with the closest key), a value of the wrong type or a
            mode outside its enum (with the allowed values).
    """
    job = compose_job(recipe, overrides, config_dir=config_dir)
    return job.run_config, job.config_dict


def to_run_config(composed: Any) -> tuple[RunConfig, dict]:
    """A composed job config (a DictConfig without its ``hydra`` node) as the typed ``RunConfig`` and a
    plain dict (modes as strings).

    Raises:
        omegaconf's errors: a key the schema does not have, or a value of the wrong type.
    """
    # Merge a plain copy: the composed nodes carry the schema's types and would take keys that
    # Hydra's `+key=value` appended; a plain dict against the schema rejects any unknown key.
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(composed, resolve=False))
    run_cfg = OmegaConf.to_object(merged)
    assert isinstance(run_cfg, RunConfig)  # a structured config converts to its dataclass
    as_dict = OmegaConf.to_container(merged, resolve=True, enum_to_str=True)
    assert isinstance(as_dict, dict)
    return run_cfg, as_dict


# ------------------------------------------------------------------------------- the schema's keys


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@cache
def schema_keys() -> tuple[str, ...]:
    """Every dotted key of ``RunConfig`` (sections and fields: ``train``, ``train.steps``, ...)."""
    def walk(cls: type, prefix: str) -> list[str]:
        keys = []
        for name, kind in _field_types(cls).items():
            keys.append(prefix + name)
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                keys.extend(walk(kind, f"{prefix}{name}."))
        return keys

    return tuple(walk(RunConfig, ""))


def _field_type(key: str) -> Optional[Any]:
    """The declared type of a dotted schema key, or None when it is not one."""
    kind: Any = RunConfig
    for part in key.split("."):
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return None
        kind = _field_types(kind).get(part)
        if kind is None:
            return None
    return kind


def unknown_key_message(key: str) -> str:
    """``<key> is not a key of the run config`` and the closest keys: a field of the same section first
    (``train.stepz`` -> ``train.steps``), else fields of a close name anywhere (``stepz`` ->
    ``sdc.inject.step or train.steps``; ``trian.steps`` -> ``train.steps``)."""
    keys = schema_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    match = [f"{parent}.{m}" if parent else m
             for m in difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1)]
    if not match:
        leaves = difflib.get_close_matches(leaf, sorted({k.rpartition(".")[2] for k in keys}), n=2)
        match = [k for leaf_match in leaves for k in keys if k.rpartition(".")[2] == leaf_match][:3]
    hint = f"did you mean {' or '.join(match)}?" if match else "`longcat-train --cfg` prints every key"
    return f"{key} is not a key of the run config; {hint}"


def _explain(exc: Exception) -> str:
    """One line for a Hydra / OmegaConf composition error: the key and the fix."""
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        OmegaConfBaseException,
        ValidationError,
    )

    chain: list[BaseException] = []
    cause: Optional[BaseException] = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for err in chain:
        key = getattr(err, "full_key", None)
        if not isinstance(err, OmegaConfBaseException) or not key:
            continue
        if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and _field_type(key) is None:
            return unknown_key_message(key)
        kind = _field_type(key)
        core = str(getattr(err, "msg", err)).split("\n")[0]
        if isinstance(err, ValidationError) and isinstance(kind, type) and issubclass(kind, enum.Enum):
            found = re.search(r"Invalid value '(.*)', expected", core)
            value = found.group(1) if found else "?"
            allowed = ", ".join(dict.fromkeys(str(m.value) for m in kind))  # aliases listed once
            return f"{key}={value}: expected one of [{allowed}]"
        return f"{key}: {core}"
    detail = str(exc).split("\nConfig search path:")[0].strip()
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", detail)
    if missing:
        group, option = missing.groups()
        options = sorted(p.stem for p in (project_root() / "conf" / group).glob("*.yaml"))
        close = difflib.get_close_matches(option, options, n=1)
        fix = f"did you mean {group}={close[0]}?" if close else "choose one of"
        return f"{group}={option}: no such option in conf/{group}; {fix} ({', '.join(options)})"
    return " ".join(detail.split())
