"""longcat-train as a Hydra app: sweeps, Hydra's flags, the run folder's .hydra/, and what it refuses."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import yaml
from conftest import tiny_overrides

import longcat.cli
from longcat.cli import main
from longcat.train.callbacks import Callback


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setattr(longcat.cli, "_setup_logging", lambda rank: None)  # keep pytest's root logger
    for name in ("WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level  # Hydra's --info adds a stdout handler (its process ends)


def _short(corpus_cache, out_dir, **extra):
    return tiny_overrides(corpus_cache, str(out_dir), **{"train.steps": 1, "train.eval_interval": 0,
                                                          "train.checkpoint_interval": 1, **extra})


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_multirun_gives_each_job_its_own_out_dir_and_hydra_files(corpus_cache, tmp_path, quiet, capsys):
    sweep = tmp_path / "sweep"
    assert main(["-m", *_short(corpus_cache, sweep), "optim.lr=0.001,0.003"]) == 0
    out = capsys.readouterr().out
    for num, lr in enumerate([0.001, 0.003]):
        job = sweep / str(num)
        assert (job / "checkpoints" / "step_00000001").is_dir(), sorted(sweep.rglob("*"))
        assert _records(job / "metrics.jsonl")[0]["lr"] == pytest.approx(lr)
        assert json.loads((job / "config.json").read_text())["train"]["out_dir"] == str(job)
        assert f"optim.lr={lr}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        saved = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert saved["optim"]["lr"] == pytest.approx(lr) and saved["train"]["out_dir"] == str(job)
        assert f"== job {num}: optim.lr={lr} -> {job}" in out
    assert (sweep / "multirun.yaml").is_file()


class _BadInputInSecondJob(Callback):
    """A ValueError (bad input: exit 2) as the second job of a sweep starts training."""

    def __init__(self):
        self.starts = 0

    def on_train_start(self, trainer, state):
        self.starts += 1
        if self.starts == 2:
            raise ValueError("injected bad input")


def test_a_failed_sweep_job_is_named_in_its_errors(corpus_cache, tmp_path, quiet, capsys):
    sweep = tmp_path / "sweep"
    args = ["-m", *_short(corpus_cache, sweep), "optim.lr=0.001,0.003"]
    assert main(args, callbacks=[_BadInputInSecondJob()]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "error: job 1 (optim.lr=0.003): injected bad input" in err, err
    assert err[-1] == f"error: 1 of 2 sweep jobs failed: job 1 (optim.lr=0.003) exit 2 in {sweep / '1'}", err


def test_run_folder_holds_hydra_files_and_hydra_run_dir_sets_out_dir(corpus_cache, tmp_path, quiet):
    args = [a for a in _short(corpus_cache, "unused") if not a.startswith("train.out_dir=")]
    run = tmp_path / "run"
    assert main([*args, f"hydra.run.dir={run}"]) == 0
    assert (run / "checkpoints" / "step_00000001").is_dir()
    assert {p.name for p in (run / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert f"hydra.run.dir={run}" in (run / ".hydra" / "hydra.yaml").read_text()
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["train"]["out_dir"] == str(run)


def test_a_second_rank_writes_no_hydra_files(corpus_cache, tmp_path, quiet, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # one process, but named rank 1: .hydra/ is rank 0's to write
    run = tmp_path / "run"
    assert main(_short(corpus_cache, run)) == 0
    assert (run / "checkpoints").is_dir() and not (run / ".hydra").exists()


def test_config_dir_and_config_name_choose_the_recipe(corpus_cache, tmp_path, quiet, capsys):
    mine = tmp_path / "recipes"
    mine.mkdir()
    text = (longcat.cli.project_root() / "recipes" / "pretrain.yaml").read_text()
    (mine / "mine.yaml").write_text(text.replace("steps: 500", "steps: 77"))
    assert main(["--config-dir", str(mine), "--config-name", "mine", "--cfg", "job"]) == 0
    assert "steps: 77" in capsys.readouterr().out
    assert main([f"recipe={mine / 'mine.yaml'}", "--cfg"]) == 0
    assert "steps: 77" in capsys.readouterr().out
    assert main(["recipe=pretrain", "--config-name", "mine", "--validate"]) == 2
    assert "give one" in capsys.readouterr().err


def test_hydra_flags(quiet, capsys, monkeypatch):
    assert main(["--cfg", "hydra"]) == 0
    hydra = yaml.safe_load(capsys.readouterr().out)["hydra"]
    assert hydra["run"]["dir"] == hydra["sweep"]["dir"] == "${train.out_dir}"
    assert main(["--cfg", "job", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main(["-sc", "install=bash"]) == 0
    assert "hydra_bash_completion" in capsys.readouterr().out
    monkeypatch.setenv("COMP_LINE", "longcat-train train.ste")
    assert main(["-sc", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == ["train.steps="]
    assert main(["--version"]) == 0
    assert main(["--info", "searchpath"]) == 0  # last: Hydra's --info leaves a stdout log handler behind
    assert "/conf" in capsys.readouterr().out
    assert main(["~logging", "--validate"]) == 0  # dropping a group's choice: the schema's defaults


@pytest.mark.parametrize("args,needle", [
    (["~train.steps", "--validate"], "~train.steps: keys of the typed run config cannot be deleted"),
    (["--cfg", "jb"], "--cfg jb: expected one of job, hydra, all"),
    (["hydra.run.dir=/tmp/a", "train.out_dir=/tmp/b"], "give one of them"),
    (["hydra.job.chdir=true"], "hydra.job.chdir=true is not supported"),
    (["-m", "train.steps=1,x"], "train.steps"),  # every job is composed before any runs
])
def test_refused_before_any_work(args, needle, quiet, capsys, monkeypatch):
    monkeypatch.setattr(longcat.cli, "_train", lambda *a, **k: pytest.fail("a run started"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err


def test_multirun_under_torchrun_is_refused(quiet, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["-m", "optim.lr=0.001,0.003"]) == 2
    assert "--multirun under torchrun" in capsys.readouterr().err


class _CtrlCOnce(Callback):
    """Ctrl-C (SIGINT to this process) after the first step of the first job only."""

    def __init__(self):
        self.sent = False

    def on_step_end(self, trainer, state):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_a_sweep_stops_the_sweep_with_the_job_checkpointed(corpus_cache, tmp_path, quiet, capsys):
    sweep = tmp_path / "sweep"
    args = ["-m", *_short(corpus_cache, sweep, **{"train.steps": 3, "train.checkpoint_interval": 0}),
            "optim.lr=0.001,0.003"]
    assert main(args, callbacks=[_CtrlCOnce()]) == 0
    out = capsys.readouterr().out
    assert "preempted at step 1 of 3" in out and "== job 1 skipped: the sweep was stopped in job 0" in out, out
    assert (sweep / "0" / "checkpoints" / "step_00000001").is_dir() and not (sweep / "1" / "checkpoints").exists()
