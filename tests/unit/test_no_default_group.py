"""No library code uses the default process group implicitly (house style: no process-group globals).

An AST walk over ``src/longcat``: a call to ``torch.distributed``'s rank / size / backend queries,
barriers or collectives must name its group (``group=...``, or positionally), and that group may not
be the literal ``None``. ``dist.group.WORLD`` (the default group by name) appears only where the
groups are built. ``launch.py`` (the entry point: ``init_process_group``, teardown) and ``testing/``
(the harness that plays the launcher) are exempt.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Iterator

import pytest
import torch.distributed as dist

SRC = Path(__file__).resolve().parents[2] / "src" / "longcat"
EXEMPT = ("launch.py", "testing/")
WORLD_ALLOWED = (*EXEMPT, "distributed/groups.py")  # ProcessGroups.build takes hold of the default group

CHECKED = (
    "get_rank", "get_world_size", "get_backend", "barrier", "monitored_barrier",
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "broadcast_object_list",
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced",
    "gather", "gather_object", "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
)


def _group_positions() -> dict[str, int]:
    """Each checked function's positional index of ``group``, read from the installed torch."""
    positions = {}
    for name in CHECKED:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        params = list(inspect.signature(fn).parameters)
        assert "group" in params, f"torch.distributed.{name} has no group parameter: update CHECKED"
        positions[name] = params.index("group")
    return positions


GROUP_POSITION = _group_positions()


def _dist_aliases(tree: ast.AST) -> tuple[set[str], dict[str, str]]:
    """Names bound to ``torch.distributed`` (``dist``, ``torch.distributed``) and names imported from it."""
    modules, functions = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.distributed":
                    modules.add(alias.asname or "torch.distributed")
                elif alias.name == "torch" and alias.asname is None:
                    modules.add("torch.distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and node.level == 0:
            modules.update(a.asname or a.name for a in node.names if a.name == "distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed" and node.level == 0:
            functions.update({a.asname or a.name: a.name for a in node.names if a.name in GROUP_POSITION})
    return modules, functions


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _called_name(call: ast.Call, modules: set[str], functions: dict[str, str]) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in GROUP_POSITION and _dotted(func.value) in modules:
        return func.attr
    if isinstance(func, ast.Name) and func.id in functions:
        return functions[func.id]
    return None


def violations(source: str, relpath: str) -> Iterator[str]:
    """``relpath:line: what`` for every implicit use of the default group in ``source``."""
    tree = ast.parse(source)
    modules, functions = _dist_aliases(tree)
    world_names = {f"{m}.{g}.WORLD" for m in modules for g in ("group", "GroupMember")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _called_name(node, modules, functions)
            if name is None or any(k.arg is None for k in node.keywords):  # **kwargs: cannot tell
                continue
            position = GROUP_POSITION[name]
            group = next((k.value for k in node.keywords if k.arg == "group"), None)
            if group is None and len(node.args) > position and not isinstance(node.args[position], ast.Starred):
                group = node.args[position]
            if group is None or _is_none(group):
                yield f"{relpath}:{node.lineno}: {name}() without a group uses the default process group"
        elif isinstance(node, ast.Attribute) and _dotted(node) in world_names and not relpath.startswith(WORLD_ALLOWED):
            yield f"{relpath}:{node.lineno}: {_dotted(node)} names the default process group; pass the group down"


def _library_files() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} files under {SRC}"
    return [f for f in files if not f.relative_to(SRC).as_posix().startswith(EXEMPT)]


def test_library_code_passes_process_groups_explicitly():
    found = [v for path in _library_files() for v in violations(path.read_text(), path.relative_to(SRC).as_posix())]
    assert not found, ("library code must receive the process group it uses (ProcessGroups, built once in "
                       "launch.py) instead of the default group:\n" + "\n".join(found))


@pytest.mark.parametrize("line", [
    "dist.get_rank()",
    "dist.get_world_size()",
    "dist.barrier()",
    "dist.all_reduce(t)",
    "dist.all_reduce(t, op=dist.ReduceOp.MAX)",
    "dist.all_reduce(t, group=None)",
    "dist.all_gather_object(out, obj)",
    "dist.all_to_all_single(out, inp, None, None)",
    "torch.distributed.barrier()",
    "x = dist.group.WORLD",
])
def test_the_check_catches_implicit_default_group_use(line):
    source = f"import torch\nimport torch.distributed as dist\n{line}\n"
    assert list(violations(source, "train/example.py")), line


def test_the_check_catches_functions_imported_by_name():
    source = "from torch.distributed import all_reduce as ar, get_rank\nar(t)\nget_rank()\n"
    assert len(list(violations(source, "train/example.py"))) == 2


@pytest.mark.parametrize("line", [
    "dist.get_rank(group)",
    "dist.get_world_size(group=self.dp_group)",
    "dist.barrier(group=groups.world_group)",
    "dist.all_reduce(t, dist.ReduceOp.SUM, group)",
    "dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.world_group)",
    "dist.all_to_all_single(out, inp, a, b, group=ep_group, async_op=True)",
    "dist.is_initialized()",
    "dist.ReduceOp.MAX",
])
def test_the_check_accepts_explicit_groups(line):
    source = f"import torch.distributed as dist\n{line}\n"
    assert not list(violations(source, "train/example.py")), line


def test_exempt_and_allowed_places():
    assert not list(violations("import torch.distributed as dist\nw = dist.group.WORLD\n", "distributed/groups.py"))
    assert {f.relative_to(SRC).as_posix() for f in _library_files()}.isdisjoint({"launch.py", "testing/jobs.py"})
