"""Two nodes as two network namespaces joined by a veth pair, launched as README.md says.

Node i is network namespace i with one veth end (10.201.0.1/30 on node 0, 10.201.0.2/30 on node 1;
no other address is used) and runs ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d
--rdzv-endpoint 10.201.0.1:PORT ... -m longcat.train`` with ``GLOO_SOCKET_IFNAME`` set to its end
(``longcat.testing.multinode``). ep=2: each node holds half of the experts.

- Node-local ``train.out_dir`` (each node its own folder) stops both nodes before any work, with the
  error that checkpoints need a folder shared by all nodes.
- A node that vanishes without a goodbye (its cable cut, then its processes killed: no RST reaches
  node 0) is declared lost by node 0's heartbeat watch, which ends node 0's job.
- A shared folder: the losses equal the single-host 2-process run's bit for bit; SIGKILL of node 1's
  torchrun (a node loss) ends node 0's job by itself within 60 s with an error; relaunching both
  nodes resumes from the newest complete checkpoint and ends with the uninterrupted run's final
  parameters, optimizer state and trainer state, bit for bit.

Needs root and ``ip netns`` (skipped with the reason otherwise). The namespaces, the veth pair and
the run folders are removed afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

from longcat.distributed.node_watch import ENV_LOST_AFTER_S
from longcat.testing.checkpoints import assert_same_state, check_checkpoint_folder, load_checkpoint
from longcat.testing.jobs import ForkedJob
from longcat.testing.multinode import TorchrunNodes
from longcat.testing.netns import VethLink, available

ADDRESSES = ("10.201.0.1", "10.201.0.2")
STEPS, INTERVAL, KILL_AFTER_STEP = 100, 10, 35
LOST_AFTER_S = 5  # the node watch's silence limit in the cut-cable test (default 30)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def link():
    """The two "nodes"; deleted (with anything still running inside) when the module's tests end."""
    ok, why = available()
    if not ok:
        pytest.skip(f"two-node test needs network namespaces: {why}")
    veth = VethLink(addresses=ADDRESSES, tag=str(os.getpid()), prefix="lcmn")
    with veth:
        yield veth


@pytest.fixture
def run_dir(tmp_path):
    """A folder for this test's runs, removed afterwards (checkpoints of a few MB each)."""
    path = tmp_path / "runs"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _overrides(corpus_cache: str, out_dir: Path) -> list[str]:
    return tiny_overrides(corpus_cache, str(out_dir), **{
        "parallel.ep": 2, "train.steps": STEPS, "train.checkpoint_interval": INTERVAL, "train.keep_last": 2,
        "train.eval_interval": 0, "determinism.enabled": "true"})


def _losses(out_dir: Path) -> dict[int, float]:
    """step -> loss of the last record of each step in metrics.jsonl (a replayed step's second record wins)."""
    path = out_dir / "metrics.jsonl"
    losses = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def _wait_for_step(nodes: TorchrunNodes, out_dir: Path, step: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while max(_losses(out_dir), default=0) < step:
        assert all(nodes.running()), "a node ended early:\n" + nodes.log(0)[-3000:] + nodes.log(1)[-3000:]
        assert time.monotonic() < deadline, f"no step {step} within {timeout_s} s"
        time.sleep(0.02)


def test_node_local_out_dirs_stop_both_nodes_before_any_work(link, corpus_cache, run_dir):
    local = [run_dir / "node0-disk", run_dir / "node1-disk"]
    nodes = TorchrunNodes.launch(link, [_overrides(corpus_cache, d) for d in local], log_dir=run_dir / "logs",
                                 port=29400, rdzv_id="local-dirs")
    try:
        started = time.monotonic()
        codes = nodes.wait(timeout_s=120)
        elapsed_s = time.monotonic() - started
    finally:
        nodes.kill_all()
    assert codes[0] != 0 and codes[1] != 0, codes
    for node in range(2):
        log = nodes.log(node)
        assert f"train.out_dir {local[node]} is not one folder shared by all ranks" in log, log[-3000:]
        assert "rank(s) [1] could not see" in log and "Checkpoints need a folder shared by all nodes" in log
        assert "exitcode: 2" in log  # the CLI's configuration error, not a crash
    assert not (local[0] / "checkpoints").exists() and not local[1].exists()
    assert elapsed_s < 60, elapsed_s


def test_two_nodes_match_one_host_survive_a_node_loss_and_resume(link, corpus_cache, run_dir):
    reference = run_dir / "one-host"
    job = ForkedJob.launch(_overrides(corpus_cache, reference), log_dir=run_dir / "one-host-logs", nproc=2)
    assert job.wait(timeout_s=180) == 0, job.log()[-3000:]

    out = run_dir / "two-nodes"  # one folder both namespaces see: a shared file system
    nodes = TorchrunNodes.launch(link, [_overrides(corpus_cache, out)] * 2, log_dir=run_dir / "launch1",
                                 port=29401, rdzv_id="run-1")
    try:
        _wait_for_step(nodes, out, KILL_AFTER_STEP)
        killed = time.monotonic()
        nodes.kill_agent(1)
        codes = nodes.wait(timeout_s=60)  # TimeoutError (and every process killed) if node 0 hangs
        node0_ended_s = time.monotonic() - killed
    finally:
        nodes.kill_all()
    node0_log, node1_log = nodes.log(0), nodes.log(1)
    assert codes[0] not in (0, None), node0_log[-3000:]
    assert "torchrun agent" in node1_log and "is gone" in node1_log, node1_log[-3000:]
    assert re.search(r"Connection (reset|closed) by peer", node0_log) and "ChildFailedError" in node0_log, \
        node0_log[-3000:]
    losses, want = _losses(out), _losses(reference)
    assert KILL_AFTER_STEP <= max(losses) < STEPS
    assert losses == {step: want[step] for step in losses}  # bit for bit, as logged before the kill

    resume_step = check_checkpoint_folder(out / "checkpoints", world_size=2).latest_step
    assert resume_step is not None and resume_step >= KILL_AFTER_STEP - INTERVAL
    nodes = TorchrunNodes.launch(link, [_overrides(corpus_cache, out)] * 2, log_dir=run_dir / "launch2",
                                 port=29402, rdzv_id="run-2")
    try:
        codes = nodes.wait(timeout_s=180)
    finally:
        nodes.kill_all()
    assert codes == [0, 0], nodes.log(0)[-3000:] + nodes.log(1)[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{resume_step:08d}'} at step {resume_step}" in nodes.log(0)
    assert _losses(out) == want
    state, trainer_state = load_checkpoint(out / "checkpoints" / f"step_{STEPS:08d}")
    ref_state, ref_trainer_state = load_checkpoint(reference / "checkpoints" / f"step_{STEPS:08d}")
    assert_same_state(state, ref_state)
    trainer_state.pop("config"), ref_trainer_state.pop("config")
    assert_same_state(trainer_state, ref_trainer_state)
    print(f"node 0 ended {node0_ended_s:.1f} s after node 1's torchrun was SIGKILLed; resumed from {resume_step}")


def test_a_node_that_vanishes_silently_is_declared_lost(link, corpus_cache, run_dir):
    out = run_dir / "two-nodes"
    overrides = tiny_overrides(corpus_cache, str(out), **{
        "parallel.ep": 2, "train.steps": 100_000, "train.checkpoint_interval": 0, "train.eval_interval": 0})
    nodes = TorchrunNodes.launch(link, [overrides] * 2, log_dir=run_dir / "logs", port=29403, rdzv_id="cut",
                                 env={ENV_LOST_AFTER_S: str(LOST_AFTER_S)})
    try:
        _wait_for_step(nodes, out, 3)
        link.set_up(1, False)  # packets to and from node 1 vanish: gloo on node 0 would wait 10 minutes
        link.kill_all(1)
        cut = time.monotonic()
        codes = nodes.wait(timeout_s=60, nodes=[0])
        node0_ended_s = time.monotonic() - cut
    finally:
        nodes.kill_all()
        link.set_up(1, True)
    log = nodes.log(0)
    assert codes[0] not in (0, None) and "exitcode: 6" in log, log[-3000:]
    assert "error: node 1 has not been heard from for" in log, log[-3000:]
    # silence counts from node 1's last beat node 0 saw, up to a poll (1 s) before the cut
    assert LOST_AFTER_S - 1.5 <= node0_ended_s < LOST_AFTER_S + 15, node0_ended_s
    print(f"node 0 ended {node0_ended_s:.1f} s after node 1 vanished")
