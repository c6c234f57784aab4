"""longcat-train's flags: --cfg and --validate reject, at compose time, every value a run would reject."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import longcat.cli
import longcat.launch
from longcat.cli import main

BAD = {  # id: (arguments, what the error names: the field and the allowed values / the fix)
    "dp_mode-typo": (["parallel.dp_mode=fdsp"], ["parallel.dp_mode=fdsp", "[replicate, fsdp, deepspeed]"]),
    "device-gpu": (["train.device=gpu"], ["train.device=gpu", "[cpu, cuda]"]),
    "negative-lr": (["optim.lr=-1"], ["optim.lr=-1.0 must be positive"]),
    "seq-over-positions": (["data.seq_length=100000"],
                           ["data.seq_length=100000 exceeds model.max_position_embeddings=4096", "raise"]),
    "sft-packing-typo": (["recipe=sft", "data.sft_packing=greddy"], ["data.sft_packing=greddy", "[pad, greedy]"]),
    "indivisible-layout": (["parallel.tp=3", "--world-size", "3"],
                           ["model.num_attention_heads=4 is not divisible by parallel.tp=3", "choose tp in [1, 2, 4]"]),
    "world-not-divisible": (["parallel.tp=2", "--world-size=3"], ["world_size=3 is not divisible by pp*tp=2"]),
    "key-typo": (["train.stepz=5"], ["train.stepz", "did you mean train.steps?"]),
}


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if anything gets as far as starting a run."""
    def refuse(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(longcat.launch, "run_training", refuse)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("flag", ["--cfg", "--validate"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_before_any_work_naming_field_and_fix(case, flag, no_run, capsys):
    args, fragments = BAD[case]
    assert main([*args, flag]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # --cfg prints no config that a run would reject
    lines = err.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("recipe", ["pretrain", "sft"])
def test_valid_recipe_validates_silently(recipe, no_run, capsys):
    assert main([f"recipe={recipe}", "--validate"]) == 0
    assert capsys.readouterr() == ("", "")


def test_cfg_prints_the_validated_config(no_run, capsys):
    assert main(["parallel=ep2", "--world-size", "2", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "ep: 2" in out and "dp_mode: replicate" in out and "pp_schedule: 1f1b" in out


def test_world_size_comes_from_the_environment(no_run, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["parallel=ep2", "--validate"]) == 0
    assert main(["parallel.tp=3", "--validate"]) == 2
    assert "world_size=2 is not divisible by pp*tp=3" in capsys.readouterr().err


def test_the_run_path_calls_the_same_validation_before_any_work(monkeypatch, capsys):
    """Without --cfg / --validate, launch.run_training refuses the config before building process groups."""
    def refuse(*args, **kwargs):
        raise AssertionError("process groups were built")

    monkeypatch.setattr(longcat.launch, "_init_distributed", refuse)
    monkeypatch.setattr(longcat.cli, "_setup_logging", lambda rank: None)  # keep the root logger as pytest left it
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["optim.lr=-1", "data.seq_length=100000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: optim.lr=-1.0 must be positive",
                   "error: data.seq_length=100000 exceeds model.max_position_embeddings=4096; raise the latter or "
                   "shorten the sequence"]


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "unknown flag --bogus"),
    (["--world-size", "0", "--validate"], "--world-size '0'"),
    (["--world-size", "2"], "--world-size goes with --cfg or --validate"),
])
def test_flag_errors(args, needle, no_run, capsys):
    assert main(args) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--info", "config", "parallel.dp_mode=fdsp"], "parallel.dp_mode=fdsp: expected one of [replicate, fsdp"),
    (["-i", "searchpath", "train.stepz=5"], "did you mean train.steps?"),
    (["--info", "all", "train.device=gpu"], "train.device=gpu: expected one of [cpu, cuda]"),
    (["--info", "config", "train.stepz=5"], "did you mean train.steps?"),
    (["--info", "defaults", "model=huge"], "model=huge: no such option in conf/model"),
])
def test_info_with_a_bad_override_is_one_error_line_and_exit_2(args, needle, no_run, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()] and err.startswith("error: ") and needle in err, err


@pytest.mark.parametrize("args", [["--cfg", "job", "-m", "optim.lr=1e-3,2e-3"], ["-m", "--info", "optim.lr=1e-3"]])
def test_conflicting_hydra_commands_are_refused_before_hydra_runs(args, no_run, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot be combined" in err and "Traceback" not in err, err


@pytest.fixture
def root_logger_kept():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level  # Hydra's --info adds a stdout handler (its process ends)


@pytest.mark.parametrize("args,needle", [
    (["--info"], "Installed Hydra Plugins"),  # bare: the settings the CLI adds must not become its value
    (["--info", "train.steps=7"], "steps: 7"),
    (["train.steps=7", "--info"], "steps: 7"),
    (["-i", "config", "train.steps=7"], "steps: 7"),
    (["--info", "defaults-tree", "~logging"], "Defaults Tree"),
    (["--cfg", "train.steps=7"], "steps: 7"),
    (["-c"], "steps: 500"),
    (["--hydra-help"], "== Flags =="),
    (["--hydra-help", "train.steps=7"], "== Flags =="),  # Hydra's help composes no recipe
    (["--help", "train.steps=7"], "recipes"),
])
def test_hydra_flags_with_and_without_overrides(args, needle, no_run, root_logger_kept, capsys):
    assert main(args) == 0
    assert needle in capsys.readouterr().out


def test_cli_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "recipes" in out and "pretrain" in out and "--validate" in out
    assert "``" not in out and "longcat.config.compose" in out  # RST markup stripped, the text kept


def test_python_m_longcat_train_runs_the_cli_and_importing_the_package_does_not():
    code = ("import sys, longcat.train, longcat.stages, longcat.testing.jobs, longcat.bench.sdc, "
            "longcat.scaling.transfer_sweep; assert 'longcat.cli' not in sys.modules, 'library imported the CLI'")
    subprocess.run([sys.executable, "-c", code], check=True)
    bottom = ("import sys, longcat.config.compose, longcat.config.validate; "
              "assert not {'torch', 'longcat.distributed'} & set(sys.modules), 'the config layer imports upwards'")
    subprocess.run([sys.executable, "-c", bottom], check=True)
    proc = subprocess.run([sys.executable, "-m", "longcat.train", "train.stepz=5", "--validate"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean train.steps?" in proc.stderr, proc.stderr


def test_a_library_value_error_during_a_run_shows_its_traceback(monkeypatch, capsys):
    """Our own checks raise ValueError with a message: one error line. A ValueError from a library (say
    torch's dtype check inside attention) is an unexpected failure: its traceback comes first."""
    from longcat.config.compose import compose_run_config
    from longcat.config.validate import validate

    monkeypatch.setattr(longcat.cli, "_setup_logging", lambda rank: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_cfg, _ = compose_run_config("pretrain", [])

    def library_failure(*args, **kwargs):
        raise ValueError("Expected query, key, and value to have the same dtype")

    def our_check(*args, **kwargs):
        validate(compose_run_config("pretrain", ["optim.lr=-1"])[0], world_size=1)  # raises in longcat's code

    monkeypatch.setattr(longcat.launch, "run_training", library_failure)
    assert longcat.cli._train(run_cfg, {}, callbacks=()) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "in library_failure" in err
    assert err.splitlines()[-1] == "error: Expected query, key, and value to have the same dtype"
    monkeypatch.setattr(longcat.launch, "run_training", our_check)
    assert longcat.cli._train(run_cfg, {}, callbacks=()) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
