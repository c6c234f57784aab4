"""Restarts and stops a cluster imposes on a 2-process run (ep=2), end to end.

- Automatic restart: under ``torchrun --max-restarts=1`` a rank SIGKILLed mid-run (fault callback, once)
  makes torchrun restart both workers; they resume from the latest checkpoint and finish with the
  uninterrupted run's final state, bit for bit.
- Graceful stop: SIGTERM to one rank stops every rank at the same step, with a checkpoint, exit 0; a
  relaunch continues from it. SIGTERM to the torchrun agent does the same through its forwarding.
- Deadline: a SIGTERM that finds the run stuck in a save exits 143 within ``train.preempt_timeout_s``,
  leaving the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from longcat.testing.checkpoints import (
    assert_same_state,
    check_checkpoint_folder,
    load_checkpoint,
)
from longcat.testing.faults import FaultPlan
from longcat.testing.jobs import ForkedJob, TorchrunJob
from longcat.train.preemption import EXIT_PREEMPT_TIMEOUT

WORLD = 2
PREEMPTED = re.compile(r"preempted at step (\d+) of")
pytestmark = pytest.mark.timeout(240)


def _overrides(corpus_cache: str, out_dir: Path, **extra) -> list[str]:
    return tiny_overrides(corpus_cache, str(out_dir), **{
        "parallel.ep": WORLD, "train.eval_interval": 0, "train.keep_last": 2, "determinism.enabled": "true", **extra})


def _num_steps_logged(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def _wait_for_steps(job, out_dir: Path, num_steps: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while _num_steps_logged(out_dir) < num_steps:
        assert job.running(), "the run ended early:\n" + job.log()[-3000:]
        assert time.monotonic() < deadline, f"no {num_steps} steps within {timeout_s} s"
        time.sleep(0.05)


def _signal_after_steps(job, out_dir: Path, num_steps: int, send) -> tuple[int, str, float]:
    """Wait for ``num_steps`` logged steps, call ``send()`` (which signals the job), wait for the job:
    its exit code, its log and the seconds from the signal to the exit."""
    try:
        _wait_for_steps(job, out_dir, num_steps)
        signalled = time.monotonic()
        send()
        rc = job.wait(timeout_s=60)
        elapsed_s = time.monotonic() - signalled
    finally:
        job.kill_all()
    return rc, job.log(), elapsed_s


def test_torchrun_restarts_a_killed_rank_from_the_latest_checkpoint(corpus_cache, tmp_path):
    steps = {"train.steps": 10, "train.checkpoint_interval": 3}
    reference = ForkedJob.launch(_overrides(corpus_cache, tmp_path / "reference", **steps),
                                 log_dir=tmp_path / "reference-logs", nproc=WORLD)
    assert reference.wait(timeout_s=120) == 0, reference.log()[-3000:]

    marker = tmp_path / "killed-once"
    job = TorchrunJob.launch(_overrides(corpus_cache, tmp_path / "run", **steps), log_path=tmp_path / "run.log",
                             nproc=WORLD, max_restarts=1,
                             faults=FaultPlan(kill_at_step="5:1", once_marker=marker))
    try:
        rc = job.wait(timeout_s=180)
    finally:
        job.kill_all()
    log = job.log()
    assert rc == 0, log[-3000:]
    assert marker.exists() and "killing rank 1 after step 5" in log
    assert re.search(r"\[rank0\].*resumed from \S+step_00000003 at step 3", log), log[-3000:]
    state, trainer_state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000010")
    ref_state, ref_trainer_state = load_checkpoint(tmp_path / "reference" / "checkpoints" / "step_00000010")
    assert_same_state(state, ref_state)
    trainer_state.pop("config"), ref_trainer_state.pop("config")
    assert_same_state(trainer_state, ref_trainer_state)


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(corpus_cache, tmp_path):
    out = tmp_path / "run"
    overrides = _overrides(corpus_cache, out, **{"train.steps": 100_000, "train.checkpoint_interval": 1000,
                                                 "train.preempt_timeout_s": 30})
    job = ForkedJob.launch(overrides, log_dir=tmp_path / "logs", nproc=WORLD)
    # the scheduler reached one rank only
    rc, log, elapsed_s = _signal_after_steps(job, out, 3, lambda: job.signal_worker(1, signal.SIGTERM))
    assert rc == 0, log[-3000:]
    assert elapsed_s < 30, elapsed_s
    assert "[rank1]" in log and "received SIGTERM" in log and not re.search(r"\[rank0\].*received SIGTERM", log)
    stop_step = int(PREEMPTED.search(log).group(1))
    folder = check_checkpoint_folder(out / "checkpoints", world_size=WORLD)  # both ranks' shards and RNG
    assert folder.complete_steps == (stop_step,) and not folder.leftovers
    assert _num_steps_logged(out) == stop_step  # rank 0 stopped at the step rank 1 asked for, not later

    resumed = ForkedJob.launch(_overrides(corpus_cache, out, **{"train.steps": stop_step + 2}),
                               log_dir=tmp_path / "resume-logs", nproc=WORLD)
    assert resumed.wait(timeout_s=120) == 0, resumed.log()[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stop_step:08d}'} at step {stop_step}" in resumed.log()


def test_sigterm_to_torchrun_checkpoints_and_workers_exit_cleanly(corpus_cache, tmp_path):
    out = tmp_path / "run"
    overrides = _overrides(corpus_cache, out, **{"train.steps": 100_000, "train.checkpoint_interval": 1000,
                                                 "train.preempt_timeout_s": 20})
    job = TorchrunJob.launch(overrides, log_path=tmp_path / "run.log", nproc=WORLD)
    rc, log, _ = _signal_after_steps(job, out, 2, lambda: job.signal_launcher(signal.SIGTERM))
    # torchrun itself exits 1 after forwarding a signal (torch.distributed.elastic raises SignalException);
    # the workers exit 0 after writing the checkpoint, which is what a requeued job resumes from.
    assert rc == 1 and "SignalException" in log, log[-3000:]
    assert "failed (exitcode" not in log, log[-3000:]
    stop_step = int(PREEMPTED.search(log).group(1))
    assert check_checkpoint_folder(out / "checkpoints", world_size=WORLD).complete_steps == (stop_step,)


def test_sigterm_during_a_stuck_save_exits_143_within_the_deadline(corpus_cache, tmp_path):
    out = tmp_path / "run"
    markers = tmp_path / "markers"
    overrides = _overrides(corpus_cache, out, **{"train.steps": 100, "train.checkpoint_interval": 2,
                                                 "train.preempt_timeout_s": 2})
    job = ForkedJob.launch(overrides, log_dir=tmp_path / "logs", nproc=WORLD,
                           faults=FaultPlan(save_pause="rename@4:600", marker_dir=markers))
    try:
        deadline = time.monotonic() + 120
        while not any(markers.glob("paused-*")):
            assert job.running() and time.monotonic() < deadline, job.log()[-3000:]
            time.sleep(0.05)
        signalled = time.monotonic()
        for rank in range(WORLD):
            job.signal_worker(rank, signal.SIGTERM)
        rc = job.wait(timeout_s=60)
        elapsed_s = time.monotonic() - signalled
    finally:
        job.kill_all()
    assert rc == EXIT_PREEMPT_TIMEOUT, job.log()[-3000:]
    assert elapsed_s < 2 + 5, elapsed_s
    assert "preemption deadline of 2 s passed: no complete checkpoint" in job.log()
    folder = check_checkpoint_folder(out / "checkpoints", world_size=WORLD)
    assert folder.complete_steps == (2,) and folder.leftovers == ("step_00000004.tmp",), folder


def test_ctrl_c_stops_with_a_checkpoint_like_sigterm(corpus_cache, tmp_path):
    out = tmp_path / "run"
    overrides = _overrides(corpus_cache, out, **{"parallel.ep": 1, "train.steps": 100_000,
                                                 "train.checkpoint_interval": 1000, "train.preempt_timeout_s": 30})
    job = ForkedJob.launch(overrides, log_dir=tmp_path / "logs", nproc=1)
    rc, log, _ = _signal_after_steps(job, out, 2, lambda: job.signal_worker(0, signal.SIGINT))
    assert rc == 0 and "received SIGINT" in log and "KeyboardInterrupt" not in log, log[-3000:]
    stop_step = int(PREEMPTED.search(log).group(1))
    folder = check_checkpoint_folder(out / "checkpoints", world_size=1)
    assert folder.complete_steps == (stop_step,) and not folder.leftovers


def test_ctrl_c_under_torchrun_stops_every_rank_once_with_one_preempted_message(corpus_cache, tmp_path):
    """Ctrl-C in the terminal: SIGINT to torchrun's process group (the test launches torchrun in its own
    session, so its pid is the group's id). torchrun forwards one SIGINT to each worker (they run in their
    own sessions, so the terminal's does not reach them twice, which would abort as a second Ctrl-C);
    both checkpoint at one step and exit cleanly, rank 0 prints one preempted line. torchrun itself exits
    1 with its SignalException (torch's behaviour, as for SIGTERM)."""
    out = tmp_path / "run"
    overrides = _overrides(corpus_cache, out, **{"train.steps": 100_000, "train.checkpoint_interval": 1000,
                                                 "train.preempt_timeout_s": 20})
    job = TorchrunJob.launch(overrides, log_path=tmp_path / "run.log", nproc=WORLD)
    rc, log, _ = _signal_after_steps(job, out, 2, lambda: os.killpg(job.proc.pid, signal.SIGINT))
    assert rc == 1 and "SignalException" in log, log[-3000:]
    assert len(PREEMPTED.findall(log)) == 1, log[-3000:]
    assert log.count("received SIGINT") == WORLD and "KeyboardInterrupt" not in log, log[-3000:]
    assert log.count("Traceback") == 1 and "failed (exitcode" not in log, log[-3000:]  # torchrun's own only
    stop_step = int(PREEMPTED.search(log).group(1))
    assert check_checkpoint_folder(out / "checkpoints", world_size=WORLD).complete_steps == (stop_step,)
