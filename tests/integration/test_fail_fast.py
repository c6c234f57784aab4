"""A failure on any rank ends the whole job quickly with its error printed (no rank waits on a dead peer).

Real ``torchrun`` jobs of 2 processes; each bad setting must end the job non-zero in well under a
minute with an ``error:`` line naming the problem, before any model is built.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_overrides

from longcat.testing.jobs import TorchrunJob

LIMIT_S = 60.0


def _run(tmp_path, corpus_cache, env=None, **extra) -> tuple[int, float, str]:
    overrides = tiny_overrides(corpus_cache, str(tmp_path / "run"), **{"parallel.ep": 2, **extra})
    start = time.monotonic()
    job = TorchrunJob.launch(overrides, log_path=tmp_path / "job.log", nproc=2, env=env)
    code = job.wait(timeout_s=LIMIT_S)
    return code, time.monotonic() - start, job.log()


def test_an_unwritable_out_dir_ends_every_rank_with_its_error(corpus_cache, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # (the tests run as root: permissions would not stop a write)
    code, elapsed_s, log = _run(tmp_path, corpus_cache, **{"train.out_dir": str(blocker / "run")})
    assert code != 0 and elapsed_s < LIMIT_S, log
    assert f"train.out_dir='{blocker / 'run'}' cannot be written" in log, log
    assert "error: rank 0: " in log and "error: rank 1: " in log


def test_wandb_online_without_a_key_is_a_clear_error(corpus_cache, tmp_path):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no_netrc")}
    code, elapsed_s, log = _run(tmp_path, corpus_cache, env=env, **{"logging.wandb.mode": "online"})
    assert code != 0 and elapsed_s < LIMIT_S, log
    assert "logging.wandb.mode=online but wandb has no API key" in log, log
    assert "UsageError" not in log  # wandb's own exception never got to run


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the run would start")
def test_a_missing_device_is_a_clear_error(corpus_cache, tmp_path):
    code, elapsed_s, log = _run(tmp_path, corpus_cache, **{"train.device": "cuda"})
    assert code != 0 and elapsed_s < LIMIT_S, log
    assert "train.device=cuda but this torch" in log and "AssertionError" not in log, log
