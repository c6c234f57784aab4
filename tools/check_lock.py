#!/usr/bin/env python
"""Compare the running environment with the lock file, or write the lock from it.

    python tools/check_lock.py --lock requirements.lock    # exit 1, naming each difference
    python tools/check_lock.py --write requirements.lock   # what `make lock` runs in a scratch venv

The lock is a pip constraints file (``name==version`` a line) holding every distribution installed
in the environment except the project itself and the bootstrap tools a venv brings (setuptools,
wheel). Local version labels are dropped (``torch==2.13.0``, not ``2.13.0+cpu``): the constraint
then matches the CPU and the CUDA build of the same release.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "longcat"
BOOTSTRAP = {"setuptools", "wheel"}  # created with the venv by the interpreter, not by `make venv`
HEADER = """\
# Every package `make venv` installs, at the exact version (pip constraints file; Python 3.11, Linux x86-64).
# Written by `make lock` (tools/check_lock.py --write); never edit by hand. To upgrade: make lock,
# rm -rf .venv && make test, commit setup.py and this file together. A test fails when the installed
# versions and this file disagree.
"""


def canonical(name: str) -> str:
    """PEP 503 normalised project name (``Jinja2`` -> ``jinja2``, ``typing_extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0`` (PEP 440 local label dropped)."""
    return version.split("+", 1)[0]


def installed() -> dict[str, str]:
    """Canonical name -> public version of every distribution in this environment but the project and
    the venv's bootstrap tools."""
    out = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"] or "")
        if name and name != PROJECT and name not in BOOTSTRAP:
            out[name] = public_version(dist.version)
    return out


def read_lock(path: Path) -> dict[str, str]:
    """Canonical name -> version of a lock file.

    Raises:
        ValueError: the file is missing, or a line is not ``name==version``.
    """
    if not path.is_file():
        raise ValueError(f"{path} does not exist; run make lock to write it")
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise ValueError(f"{path}:{number}: {line!r} is not name==version; rewrite the lock with make lock")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def differences(pins: dict[str, str], found: dict[str, str]) -> list[str]:
    """Each disagreement between the lock's ``pins`` and the ``found`` environment, one line each."""
    problems = [f"{name}: locked {pins[name]}, installed {found[name]}"
                for name in sorted(set(pins) & set(found)) if public_version(pins[name]) != found[name]]
    problems += [f"{name}: locked {pins[name]}, not installed" for name in sorted(set(pins) - set(found))]
    problems += [f"{name}: installed {found[name]}, not in the lock" for name in sorted(set(found) - set(pins))]
    return problems


def write_lock(path: Path) -> int:
    """Write the lock from this environment; returns the number of pins."""
    pins = installed()
    path.write_text(HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    return len(pins)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--lock", type=Path, help="check this environment against the lock file")
    action.add_argument("--write", type=Path, help="write the lock file from this environment")
    args = parser.parse_args(argv)
    if args.write:
        print(f"wrote {args.write}: {write_lock(args.write)} packages")
        return 0
    try:
        problems = differences(read_lock(args.lock), installed())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if problems:
        print(f"error: this environment ({sys.prefix}) disagrees with {args.lock}:\n  " + "\n  ".join(problems)
              + "\nRebuild it from the lock (rm -rf .venv && make venv), or re-lock (make lock) if setup.py changed.",
              file=sys.stderr)
        return 1
    print(f"{args.lock}: all {len(installed())} installed packages match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
