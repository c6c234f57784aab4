"""The node watch of a torchrun worker (``longcat.distributed.node_watch``) against a real TCPStore:
node 0 declares a silent node lost and tells the others through the store, a node that cannot reach
the store stops by itself, a worker whose agent is gone stops; and the judge's arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from longcat.distributed import node_watch
from longcat.distributed.node_watch import (
    EXIT_AGENT_LOST,
    EXIT_NODE_LOST,
    HeartbeatJudge,
    NodeWatch,
    NodeWatchSettings,
    process_state,
    start_node_watch,
)
from longcat.testing import find_free_port

FAST = NodeWatchSettings(poll_interval_s=0.05, agent_poll_interval_s=0.02, lost_after_s=0.5, start_grace_s=0.5,
                         store_timeout_s=0.5)


@pytest.fixture
def store():
    port = find_free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    yield server, port


def _env(port: int, *, node: int, local_rank: int = 0) -> dict[str, str]:
    return {"TORCHELASTIC_RUN_ID": "t", "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2",
            "GROUP_RANK": str(node), "LOCAL_RANK": str(local_rank), "RANK": str(node), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _run(watch: NodeWatch, *, timeout_s: float = 10.0) -> None:
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "the watch did not stop"


def test_node_0_declares_a_silent_node_lost_and_the_others_read_why(store, capfd):
    _, port = store
    codes: list[int] = []
    node1 = NodeWatch(FAST, _env(port, node=1), exit_fn=codes.append)

    def beat_a_while():  # node 1 beats for 0.3 s, then falls silent (its power is cut)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            node1._poll_store()
            time.sleep(0.05)

    beater = threading.Thread(target=beat_a_while)
    node0 = NodeWatch(FAST, _env(port, node=0), exit_fn=codes.append)
    beater.start()
    _run(node0)
    beater.join()
    assert codes == [EXIT_NODE_LOST]
    err = capfd.readouterr().err
    assert "[rank0] error: node 1 has not been heard from for" in err and "node 0 (" in err

    # a worker of node 1 still alive (say local rank 1) finds the note and stops with node 0's reason
    _run(NodeWatch(FAST, _env(port, node=1, local_rank=1), exit_fn=codes.append))
    assert codes == [EXIT_NODE_LOST, EXIT_NODE_LOST]
    assert "[rank1] error: node 1 has not been heard from for" in capfd.readouterr().err


def test_a_node_that_never_reports_is_lost_after_the_start_grace(store, capfd):
    _, port = store
    codes: list[int] = []
    _run(NodeWatch(FAST, _env(port, node=0), exit_fn=codes.append))
    assert codes == [EXIT_NODE_LOST] and "node 1 never reported within" in capfd.readouterr().err


def test_a_node_that_cannot_reach_the_store_stops(capfd):
    codes: list[int] = []
    _run(NodeWatch(FAST, _env(find_free_port(), node=1), exit_fn=codes.append), timeout_s=20)
    assert codes == [EXIT_NODE_LOST]
    assert "node 1 cannot reach torchrun's store on node 0 (127.0.0.1:" in capfd.readouterr().err


def test_a_worker_whose_agent_is_gone_stops(capfd):
    codes: list[int] = []
    watch = NodeWatch(FAST, {"TORCHELASTIC_RUN_ID": "t", "RANK": "3"}, exit_fn=codes.append)
    watch.agent_pid = -1  # as if the parent had changed: the agent died and the worker was re-parented
    _run(watch)
    assert codes == [EXIT_AGENT_LOST] and "[rank3] error: this worker's torchrun agent" in capfd.readouterr().err


# An agent whose main thread ended while another thread runs on: the process stays (its workers keep
# it as their parent) but is defunct; torchrun's agent was seen in this state after a crash.
_HALF_DEAD_AGENT = """
import ctypes, threading, time
threading.Thread(target=lambda: time.sleep(60)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_worker_whose_agent_is_defunct_stops(capfd, monkeypatch):
    agent = subprocess.Popen([sys.executable, "-c", _HALF_DEAD_AGENT], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while process_state(agent.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_state(agent.pid) == "Z"
        codes: list[int] = []
        monkeypatch.setattr(node_watch.os, "getppid", lambda: agent.pid)  # the worker's parent is that agent
        watch = NodeWatch(FAST, {"TORCHELASTIC_RUN_ID": "t", "RANK": "2"}, exit_fn=codes.append)
        assert watch.agent_pid == agent.pid
        _run(watch)
        assert codes == [EXIT_AGENT_LOST]
        assert f"[rank2] error: this worker's torchrun agent (pid {agent.pid}) is defunct" in capfd.readouterr().err
    finally:
        agent.kill()
        agent.wait()


def test_process_state_reads_proc():
    assert process_state(os.getpid()) in ("R", "S")
    assert process_state(2**22 + 12345) is None  # above any pid_max: no such process


def test_judge_counts_silence_from_the_last_change():
    judge = HeartbeatJudge([1, 2], now=0.0, lost_after_s=10.0, start_grace_s=60.0)
    assert judge.observe(1, 0, now=59.0) is None  # not started yet, within the grace
    assert "never reported" in judge.observe(1, 0, now=61.0)
    assert judge.observe(2, 1, now=5.0) is None
    assert judge.observe(2, 1, now=14.0) is None
    assert judge.observe(2, 2, now=14.5) is None  # moved: the clock restarts
    assert judge.observe(2, 2, now=24.0) is None
    assert "has not been heard from for 10 s" in judge.observe(2, 2, now=24.6)


def test_settings_from_env_and_outside_torchrun():
    assert NodeWatchSettings.from_env({}).lost_after_s == 30.0
    assert NodeWatchSettings.from_env({"LONGCAT_NODE_LOST_AFTER_S": "0"}).lost_after_s == 0.0
    with pytest.raises(ValueError, match="LONGCAT_NODE_LOST_AFTER_S='soon'"):
        NodeWatchSettings.from_env({"LONGCAT_NODE_LOST_AFTER_S": "soon"})
    assert start_node_watch(env={}) is None  # not a torchrun worker: nothing to watch
