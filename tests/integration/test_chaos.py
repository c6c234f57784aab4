"""Kill anywhere: SIGKILL a worker of a 2-process run (the CLI, ep=2) at random moments, relaunch, repeat.

One run of ``STEPS`` steps (checkpoint every ``INTERVAL``, ``keep_last=2``) is killed ``NUM_KILLS``
times: during start-up or restore, mid-step, and inside each phase of a checkpoint save (a fault
callback pauses the save there, see ``longcat.testing.faults``); one rank, the other, or both. After every
kill the checkpoint folder is checked (every ``step_N`` whole, the newest complete one never lost) and
the run is relaunched with ``train.resume=auto``; the relaunch must resume from that newest complete
checkpoint. Workers are forked from a preloaded server (``longcat.testing.jobs.ForkedJob``: a launch
costs a fork, not three torch imports); tests/integration/test_restart.py covers real torchrun. The
finished run's final checkpoint (parameters, AdamW moments, trainer state) and every logged step's
loss and grad norm equal those of an uninterrupted run bit for bit.

Determinism relied on: ``determinism.enabled=true`` (deterministic kernels, per-rank seeded streams),
fp32 on CPU with one intra-op thread per process (``OMP_NUM_THREADS=1``), and gloo, whose 2-rank
all-reduce sums in a fixed order. (fp32 CPU with fixed threads alone also reproduces bit for bit.)
The kill schedule is seeded (``LONGCAT_CHAOS_SEED``, default 0) and printed, so a failure replays.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from longcat.testing.checkpoints import (
    assert_same_state,
    check_checkpoint_folder,
    load_checkpoint,
)
from longcat.testing.faults import SAVE_PHASES, FaultPlan
from longcat.testing.jobs import ForkedJob

STEPS = 60  # each launch advances a few steps at most: 12 kills never reach the end
INTERVAL = 2
KEEP_LAST = 2
NUM_KILLS = 12
WORLD = 2
RESUMED = re.compile(r"\[rank0\].*resumed from (\S+) at step (\d+)")

pytestmark = pytest.mark.timeout(400)


def _overrides(corpus_cache: str, out_dir: Path) -> list[str]:
    return tiny_overrides(corpus_cache, str(out_dir), **{
        "train.steps": STEPS, "train.checkpoint_interval": INTERVAL, "train.keep_last": KEEP_LAST,
        "train.eval_interval": 10, "parallel.ep": WORLD, "determinism.enabled": "true",
        # the launcher SIGTERMs the surviving rank (as torchrun does); one paused in a save hook gives up then
        "train.preempt_timeout_s": 2})


def _step_records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a SIGKILL mid-write (metrics are not checkpoints)
            continue
    return [r for r in records if "loss" in r]


def _wait_until(predicate, *, job: ForkedJob, timeout_s: float) -> bool:
    """Poll ``predicate`` until true (True), the job exits or the timeout passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not job.running():
            return False
        time.sleep(0.01)
    return False


KINDS = ("startup", "training", "training", *SAVE_PHASES)  # startup: also kills during restore


def _kill_kinds(rng: random.Random) -> list[str]:
    """NUM_KILLS kinds: every kind at least once, the rest drawn at random, in a random order."""
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(NUM_KILLS - len(KINDS))]
    rng.shuffle(kinds)
    return kinds


def _plan(rng: random.Random, where: str, resume_step: int) -> dict:
    """One kill: where (start-up, mid-training, a save phase) and whom (rank 0, rank 1, both)."""
    if resume_step + 4 * INTERVAL > STEPS:  # too close to the end for a kill after progress to land
        where = "startup"
    plan = {"where": where, "ranks": rng.choice([[0], [1], [0, 1]])}
    if where == "startup":
        plan["delay_s"] = rng.uniform(0.0, 1.5)
    elif where == "training":
        plan["delay_s"] = rng.uniform(0.0, 0.6)
    elif where != "discard":  # "discard" pauses in the first deletion of an old checkpoint
        plan["save_step"] = resume_step - resume_step % INTERVAL + INTERVAL * rng.randint(1, 3)
    return plan


def _kill_per_plan(job: ForkedJob, plan: dict, *, out_dir: Path, marker_dir: Path, lines_before: int) -> bool:
    """Carry out ``plan`` on a running job; False when the job ended before the kill could land."""
    if plan["where"] == "startup":
        time.sleep(plan["delay_s"])
    elif plan["where"] == "training":
        if not _wait_until(lambda: len(_step_records(out_dir)) > lines_before, job=job, timeout_s=60):
            return False
        time.sleep(plan["delay_s"])
    elif not _wait_until(lambda: any(marker_dir.glob("paused-*")), job=job, timeout_s=60):
        return False
    if len(job.workers()) < WORLD:
        return False
    job.kill_workers(plan["ranks"])
    return True


def _run_uninterrupted(corpus_cache: str, out_dir: Path) -> None:
    job = ForkedJob.launch(_overrides(corpus_cache, out_dir), log_dir=out_dir.with_suffix(".logs"), nproc=WORLD)
    assert job.wait(timeout_s=120) == 0, job.log()[-3000:]


def _killed_launch(corpus_cache: str, chaos: Path, plan: dict, *, log_dir: Path) -> str:
    """Launch the run, kill it as ``plan`` says, wait for every rank to end; returns its log."""
    marker_dir = log_dir / "markers"
    save_pause = None
    if plan["where"] in SAVE_PHASES:
        save_pause = plan["where"] + (f"@{plan['save_step']}" if "save_step" in plan else "") + ":600"
    faults = FaultPlan(save_pause=save_pause, marker_dir=marker_dir)
    started = time.monotonic()
    job = ForkedJob.launch(_overrides(corpus_cache, chaos), log_dir=log_dir, nproc=WORLD, faults=faults)
    try:
        killed = _kill_per_plan(job, plan, out_dir=chaos, marker_dir=marker_dir,
                                lines_before=len(_step_records(chaos)))
        rc = job.wait(timeout_s=90)
    finally:
        job.kill_all()
    print(f"{log_dir.name}: plan={plan} rc={rc} ({time.monotonic() - started:.1f} s)")
    assert killed, f"the run ended before the planned kill {plan} (rc={rc}); raise STEPS:\n{job.log()[-2000:]}"
    assert rc != 0, f"a killed job exited 0 (plan {plan})"
    return job.log()


def _check_after_kill(chaos: Path, log: str, *, resume_step: int, latest_seen: int | None) -> int | None:
    """The launch resumed (if it got that far) from the newest complete checkpoint; after the kill every
    ``step_N`` is whole and the newest complete checkpoint survived (or a newer one replaced it)."""
    resumed = RESUMED.findall(log)
    if resumed:
        assert int(resumed[0][1]) == resume_step and Path(resumed[0][0]).name == f"step_{resume_step:08d}", resumed
    after = check_checkpoint_folder(chaos / "checkpoints", world_size=WORLD)
    if latest_seen is not None:
        assert after.latest_step is not None and after.latest_step >= latest_seen, (after, latest_seen)
    assert len(after.complete_steps) <= KEEP_LAST + 1, after  # + 1: killed between rename and retention
    return after.latest_step


def _assert_matches_reference(chaos: Path, reference: Path) -> None:
    """Final checkpoint bit for bit, and every step any launch completed (replays included) logged the
    reference's loss and grad norm exactly."""
    final = check_checkpoint_folder(chaos / "checkpoints", world_size=WORLD)
    assert final.latest_step == STEPS and not final.leftovers, final
    state, trainer_state = load_checkpoint(chaos / "checkpoints" / f"step_{STEPS:08d}")
    ref_state, ref_trainer_state = load_checkpoint(reference / "checkpoints" / f"step_{STEPS:08d}")
    assert_same_state(state, ref_state)
    trainer_state.pop("config"), ref_trainer_state.pop("config")  # differs in out_dir only
    assert_same_state(trainer_state, ref_trainer_state)
    expected = {r["step"]: (r["loss"], r["grad_norm"]) for r in _step_records(reference)}
    records = _step_records(chaos)
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    mismatched = [r["step"] for r in records if (r["loss"], r["grad_norm"]) != expected[r["step"]]]
    assert not mismatched, f"steps whose loss or grad norm differ from the uninterrupted run: {mismatched}"


def test_kill_anywhere_then_resume_matches_uninterrupted_run(corpus_cache, tmp_path):
    rng = random.Random(int(os.environ.get("LONGCAT_CHAOS_SEED", "0")))
    reference, chaos = tmp_path / "reference", tmp_path / "chaos"
    _run_uninterrupted(corpus_cache, reference)

    latest_seen, kinds = None, set()
    for kill, where in enumerate(_kill_kinds(rng)):
        resume_step = check_checkpoint_folder(chaos / "checkpoints", world_size=WORLD).latest_step or 0
        plan = _plan(rng, where, resume_step)
        log = _killed_launch(corpus_cache, chaos, plan, log_dir=tmp_path / f"kill{kill:02d}")
        latest_seen = _check_after_kill(chaos, log, resume_step=resume_step, latest_seen=latest_seen)
        kinds.add(plan["where"])
    print(f"{NUM_KILLS} kills; kinds: {sorted(kinds)}")

    job = ForkedJob.launch(_overrides(corpus_cache, chaos), log_dir=tmp_path / "final", nproc=WORLD)
    try:
        assert job.wait(timeout_s=120) == 0, job.log()[-3000:]
    finally:
        job.kill_all()
    assert f"step_{latest_seen:08d} at step {latest_seen}" in job.log()
    _assert_matches_reference(chaos, reference)


# ---------------------------------------------------------------- checkpoints hold verified state
SDC_STEPS = 20
SDC_FAULT = {"sdc.inject.step": 13, "sdc.inject.rank": 1, "sdc.inject.target": "parameter",
             "sdc.inject.tensor": "model.layers.0.mlps.0.up_proj.weight", "sdc.inject.bit": 27}


def _sdc_overrides(corpus_cache: str, out_dir: Path, **extra) -> list[str]:
    # replica_interval=100: the periodic check never runs in this window; only the check right before
    # each checkpoint and the one after a resume can see the fault.
    return tiny_overrides(corpus_cache, str(out_dir), **{
        "train.steps": SDC_STEPS, "train.checkpoint_interval": INTERVAL, "train.keep_last": 3,
        "train.eval_interval": 0, "parallel.ep": WORLD, "determinism.enabled": "true",
        "sdc.replica_interval": 100, "sdc.policy": "rollback", **extra})


def test_parameter_flip_before_a_checkpoint_then_kill_rolls_back_to_a_clean_checkpoint(corpus_cache, tmp_path):
    """A bit flips in rank 1's replica after step 13's optimizer step; step 14's checkpoint is about to be
    written: the replicas are compared first, disagree, so nothing is written and every rank reloads
    step 12. The run is SIGKILLed after step 16 and relaunched: the relaunch compares the replicas after
    its first step, and the finished run equals a run that never had the fault, bit for bit."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    job = ForkedJob.launch(_sdc_overrides(corpus_cache, reference), log_dir=tmp_path / "ref-logs", nproc=WORLD)
    assert job.wait(timeout_s=120) == 0, job.log()[-3000:]

    faults = FaultPlan(kill_at_step=f"16:{WORLD - 1}", once_marker=tmp_path / "killed-once")
    job = ForkedJob.launch(_sdc_overrides(corpus_cache, run, **SDC_FAULT), log_dir=tmp_path / "first",
                           nproc=WORLD, faults=faults)
    try:
        assert job.wait(timeout_s=120) != 0, "the run was to be killed after step 16"
    finally:
        job.kill_all()
    log = job.log()
    assert f"SDC suspected (replica check) at step 14 on rank 1: tensor '{SDC_FAULT['sdc.inject.tensor']}'" in log, \
        log[-3000:]
    assert re.search(r"SDC rollback: reloaded \S+step_00000012 \(step 12\) after the mismatch at step 14", log), \
        log[-3000:]
    complete = check_checkpoint_folder(run / "checkpoints", world_size=WORLD)
    assert complete.latest_step == 16, complete

    job = ForkedJob.launch(_sdc_overrides(corpus_cache, run, **SDC_FAULT), log_dir=tmp_path / "second", nproc=WORLD)
    try:
        assert job.wait(timeout_s=120) == 0, job.log()[-3000:]
    finally:
        job.kill_all()
    assert "step_00000016 at step 16" in job.log()
    records = {r["step"]: r for r in _step_records(run)}
    assert records[17]["sdc/replica_checks"] == 1 and records[17]["sdc/mismatches"] == 0  # checked at once

    state, trainer_state = load_checkpoint(run / "checkpoints" / f"step_{SDC_STEPS:08d}")
    ref_state, ref_trainer_state = load_checkpoint(reference / "checkpoints" / f"step_{SDC_STEPS:08d}")
    assert_same_state(state, ref_state)
    trainer_state.pop("config"), ref_trainer_state.pop("config")
    assert_same_state(trainer_state, ref_trainer_state)
    expected = {r["step"]: (r["loss"], r["grad_norm"]) for r in _step_records(reference)}
    assert {s: (r["loss"], r["grad_norm"]) for s, r in records.items()} == expected
