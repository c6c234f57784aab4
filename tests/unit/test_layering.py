"""The package's layering holds: ``lint-imports`` passes on the contracts in ``.importlinter``
(docs/architecture.md "Layers"), and the same harness reports a broken contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / ".importlinter"


def _lint_imports(config: Path) -> subprocess.CompletedProcess:
    """``lint-imports CONFIG`` on this checkout's ``src`` (the console script's own entry point)."""
    paths = [str(ROOT / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, "--no-cache", "--no-logo", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = _lint_imports(CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_a_broken_contract_fails(tmp_path):
    """The harness is not vacuous: a contract the code breaks (train imports model) is reported."""
    config = tmp_path / "broken.ini"
    config.write_text(
        "[importlinter]\nroot_package = longcat\n\n"
        "[importlinter:contract:broken]\nname = train without model\ntype = forbidden\n"
        "source_modules =\n    longcat.train\nforbidden_modules =\n    longcat.model\n"
    )
    result = _lint_imports(config)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "longcat.train" in result.stdout, result.stdout


def test_docs_cite_the_paper_not_files_users_do_not_have():
    """Docstrings and docs cite arXiv 2509.01322 (section, equation), not the team's private notes."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    private = re.compile(r"\b(PAPER|STYLE|DESIGN)\.md\b")
    found = [f"{p.relative_to(root)}:{n}" for folder in ("src", "docs", "recipes", "conf", "tools")
             for p in sorted((root / folder).rglob("*")) if p.suffix in (".py", ".md", ".yaml")
             for n, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    found += [f"README.md:{n}" for n, line in enumerate((root / "README.md").read_text().splitlines(), 1)
              if private.search(line)]
    assert not found, found


def test_docs_hold_no_placeholders_and_quote_the_recipes_step_counts():
    """A doc section left as a placeholder (a bare RESULTS / TODO / TBD line) or quoting a step count
    the recipe it names does not have misleads a reader."""
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    placeholders = [f"{p.relative_to(root)}:{n}" for p in docs
                    for n, line in enumerate(p.read_text().splitlines(), 1)
                    if line.strip() in ("RESULTS", "TODO", "TBD", "XXX")]
    assert not placeholders, placeholders
    wrong = []
    for p in docs:
        for recipe, steps in re.findall(r"`recipes/(\w+)\.yaml`, (\d+) steps", p.read_text()):
            actual = yaml.safe_load((root / "recipes" / f"{recipe}.yaml").read_text())["train"]["steps"]
            if int(steps) != actual:
                wrong.append(f"{p.relative_to(root)}: recipes/{recipe}.yaml, {steps} steps (the recipe: {actual})")
    assert not wrong, wrong
