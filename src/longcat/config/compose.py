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
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from longcat.config.schema import RunConfig

__all__ = ["SCHEMA_NAME", "available_recipes", "compose_run_config", "project_root", "register_schema",
           "schema_keys", "unknown_key_message"]

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
    return Path(__file__).resolve().parents[3]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (project_root() / "recipes").glob("*.yaml"))


def compose_run_config(recipe: str, overrides: Sequence[str] = ()) -> tuple[RunConfig, dict]:
    """Compose ``recipe`` with ``overrides`` against the typed schema.

    Args:
        recipe: a name in ``recipes/`` or a path to a YAML recipe.
        overrides: Hydra overrides (``train.steps=50``, ``model=small``, ``+key=value``).

    Returns:
        The typed ``RunConfig`` and the same as a plain dict (modes as strings; for checkpoints and wandb).

    Raises:
        ValueError: unknown recipe, unknown key (with the closest key), a value of the wrong type or a
            mode outside its enum (with the allowed values).
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
        run_cfg = OmegaConf.to_object(merged)
        assert isinstance(run_cfg, RunConfig)  # a structured config converts to its dataclass
    except Exception as exc:  # Hydra/OmegaConf errors: re-raise as one clear message
        raise ValueError(f"bad configuration for recipe {recipe!r}: {_explain(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
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
