"""The environment equals requirements.lock, and the check can tell when it does not."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", REPO / "tools" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_versions_equal_the_lock():
    """In a fresh interpreter, as ``make venv`` runs the check: this test process's ``sys.path`` is not
    the environment's (inductor's C++ builder puts setuptools' vendored packages on it, packaging 26.3
    among them, once any test has compiled)."""
    done = subprocess.run([sys.executable, str(REPO / "tools" / "check_lock.py"), "--lock", str(LOCK)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "installed packages match" in done.stdout


def test_the_lock_pins_the_stack():
    pins = _check_lock().read_lock(LOCK)
    for name in ("torch", "transformers", "tokenizers", "safetensors", "hydra-core", "omegaconf", "wandb",
                 "deepspeed", "numpy", "matplotlib", "pytest", "ruff", "mypy", "import-linter", "pip"):
        assert name in pins, name
    assert "+" not in pins["torch"]  # matches the CPU and the CUDA build of the release


def test_a_drifted_environment_is_named(tmp_path, capsys):
    tool = _check_lock()
    pins = tool.read_lock(LOCK)
    drifted = dict(pins, transformers="5.0.0", notapackage="1.0")
    del drifted["numpy"]
    lock = tmp_path / "requirements.lock"
    lock.write_text("".join(f"{name}=={version}\n" for name, version in drifted.items()))
    assert tool.main(["--lock", str(lock)]) == 1
    err = capsys.readouterr().err
    installed = tool.installed()
    assert f"transformers: locked 5.0.0, installed {installed['transformers']}" in err
    assert "notapackage: locked 1.0, not installed" in err
    assert f"numpy: installed {installed['numpy']}, not in the lock" in err


def test_a_malformed_lock_line_is_named(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch>=2.9\n")
    with pytest.raises(ValueError, match=r"requirements.lock:1: 'torch>=2.9' is not name==version"):
        _check_lock().read_lock(lock)
