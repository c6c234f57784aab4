"""``restart_safe_store``: a torchrun worker reaches node 0's store, or stops with the fix in the error."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from longcat.distributed.elastic import restart_safe_store
from longcat.testing import find_free_port


def _torchrun_env(monkeypatch, *, port: int, node: int, host: str = "127.0.0.1") -> None:
    for key, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": host, "MASTER_PORT": str(port),
                       "GROUP_RANK": str(node), "TORCHELASTIC_RESTART_COUNT": "2"}.items():
        monkeypatch.setenv(key, value)


def test_outside_torchrun_there_is_no_shared_store(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_safe_store(timeout=timedelta(seconds=5)) is None


def test_keys_are_per_restart_and_a_loopback_store_that_answers_is_fine(monkeypatch):
    """Several "nodes" on one machine: node 1 reaches node 0's store over loopback."""
    port = find_free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    _torchrun_env(monkeypatch, port=port, node=1)
    store = restart_safe_store(timeout=timedelta(seconds=5))
    store.set("k", "v")
    assert server.get("longcat/attempt_2/k") == b"v"


def test_a_loopback_master_addr_on_another_node_fails_fast_with_the_fix(monkeypatch):
    _torchrun_env(monkeypatch, port=find_free_port(), node=1, host="localhost")
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"node 1: torchrun's store is on node 0, but MASTER_ADDR='localhost'.*"
                                         r"loopback address, and nothing answers there.*--local-addr"):
        restart_safe_store(timeout=timedelta(minutes=10))
    assert time.monotonic() - started < 60  # not the store's 10 minutes (10-16 s seen, slower on a loaded machine)


def test_an_unreachable_store_fails_after_the_connect_timeout(monkeypatch):
    _torchrun_env(monkeypatch, port=find_free_port(), node=0)
    message = r"node 0: cannot reach torchrun's store at MASTER_ADDR='127.0.0.1'.* within 1 s"
    with pytest.raises(ValueError, match=message):
        restart_safe_store(timeout=timedelta(minutes=10), connect_timeout=timedelta(seconds=1))
