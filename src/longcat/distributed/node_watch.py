"""Every torchrun worker watches its own agent and, on several nodes, the other nodes.

Two faults used to leave a multi-node job running or hanging instead of failing:

- **Agent death.** torchrun starts its workers in their own sessions, so SIGKILL of a node's agent
  (a scheduler's kill, the OOM killer, ``kill -9``) leaves its workers running as orphans: they
  train on with the other nodes, which then wait five minutes in torchrun's exit barrier for the
  dead agent, and the run reports success.
- **Node loss without a goodbye** (power cut, kernel panic, network partition): no FIN or RST
  reaches the survivors, so they wait in their next collective for gloo's 10-minute timeout, and
  their agents watch only their own workers.

``start_node_watch()`` (the first thing ``python -m longcat.train`` does) starts a daemon thread in
each worker that, every ``poll_interval_s``:

1. exits the worker (``EXIT_AGENT_LOST``) when its parent, the torchrun agent, is gone, or half gone:
   its main thread ended while another thread lives on (``/proc/<pid>/stat`` state ``Z``, ``ps`` shows
   ``<defunct>``), which leaves the worker's parent unchanged but nobody watching it;
2. on a multi-node run with torchrun's shared store (the default): local rank 0 of each node adds 1
   to its node's heartbeat counter in the store (which node 0's agent hosts); local rank 0 of node 0
   judges: a node whose counter has not moved for ``lost_after_s`` (or that never beat within
   ``start_grace_s``) is lost; the judge writes why under a ``lost`` key and exits
   (``EXIT_NODE_LOST``). Every worker exits with that message when it sees the key, and with its
   own when it cannot reach the store for ``lost_after_s`` (node 0 lost, or the network cut).

A worker that exits makes its peers fail in their next collective ("Connection reset by peer"), and
each agent then ends its node's job; relaunching every node resumes from the newest complete
checkpoint. The thread runs whatever the main thread does (a collective, a save, data preparation),
so it tells a live node from a dead one, not a slow one from a fast one: a node that hangs while
alive is still caught only by the collective timeout.

``LONGCAT_NODE_LOST_AFTER_S`` (default 30) sets ``lost_after_s``; 0 turns the node watch off (the
agent watch stays).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, Optional

import torch.distributed as dist

__all__ = ["ENV_LOST_AFTER_S", "EXIT_AGENT_LOST", "EXIT_NODE_LOST", "HeartbeatJudge", "NodeWatch", "NodeWatchSettings",
           "process_state", "start_node_watch"]

EXIT_AGENT_LOST = 5  # this worker's torchrun agent died; the worker stopped itself
EXIT_NODE_LOST = 6  # another node stopped beating, or the store on node 0 cannot be reached
ENV_LOST_AFTER_S = "LONGCAT_NODE_LOST_AFTER_S"


@dataclass(frozen=True)
class NodeWatchSettings:
    """Seconds: how often to look, and after how long a silent node counts as lost."""

    poll_interval_s: float = 1.0  # the store: beat, look for a lost node
    agent_poll_interval_s: float = 0.2  # the parent pid (no I/O)
    lost_after_s: float = 30.0  # 0: no node watch (the agent watch stays)
    start_grace_s: float = 120.0  # for a node's first beat: its workers start and import torch first
    store_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeWatchSettings:
        """Defaults, with ``lost_after_s`` from ``LONGCAT_NODE_LOST_AFTER_S`` when set.

        Raises:
            ValueError: the variable is not a number >= 0.
        """
        raw = env.get(ENV_LOST_AFTER_S)
        if raw is None:
            return cls()
        try:
            lost_after_s = float(raw)
        except ValueError:
            lost_after_s = -1.0
        if lost_after_s < 0:
            raise ValueError(f"{ENV_LOST_AFTER_S}={raw!r}: give seconds >= 0 (0 turns the node watch off)")
        return cls(lost_after_s=lost_after_s)


class HeartbeatJudge:
    """Node 0's view of the other nodes' heartbeat counters; ``now`` is ``time.monotonic()`` seconds.

    A node is lost when its counter has not changed for ``lost_after_s`` since it last changed, or,
    before its first beat, for ``start_grace_s`` since the judge started.
    """

    def __init__(self, nodes: list[int], *, now: float, lost_after_s: float, start_grace_s: float):
        self.lost_after_s, self.start_grace_s = lost_after_s, start_grace_s
        self._last: dict[int, tuple[int, float]] = {node: (0, now) for node in nodes}

    def observe(self, node: int, count: int, *, now: float) -> Optional[str]:
        """Record ``node``'s counter; returns why the node is lost, or None."""
        value, since = self._last[node]
        if count != value:
            self._last[node] = (count, now)
            return None
        silent_s = now - since
        if count == 0 and silent_s > self.start_grace_s:
            return (f"node {node} never reported within {self.start_grace_s:.0f} s of the start: its workers did not "
                    "start, or cannot reach torchrun's store on node 0 (see that node's log)")
        if count and silent_s > self.lost_after_s:
            return (f"node {node} has not been heard from for {silent_s:.0f} s (lost after {self.lost_after_s:.0f} s): "
                    "its power, kernel or network is gone, or its agent and workers were killed")
        return None


class NodeWatch:
    """What the watch thread does (``run``), from a torchrun worker's environment ``env``.

    ``exit_fn(code)`` ends the worker (``os._exit`` in ``start_node_watch``; tests pass a recorder),
    after a line ``[rankR] error: <reason>; ...`` on stderr.
    """

    def __init__(self, settings: NodeWatchSettings, env: Mapping[str, str], *, exit_fn: Callable[[int], None]):
        self.settings, self.exit_fn = settings, exit_fn
        self.agent_pid = os.getppid()
        self.rank = env.get("RANK", "?")
        self.node_rank = int(env.get("GROUP_RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.num_nodes = int(env.get("GROUP_WORLD_SIZE", "1"))
        self.address = (env.get("MASTER_ADDR", ""), int(env.get("MASTER_PORT", "0") or 0))
        self.watch_nodes = (self.num_nodes > 1 and settings.lost_after_s > 0
                            and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
        self.prefix = f"longcat/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/node_watch"
        self.store: Optional[dist.Store] = None
        self.judge: Optional[HeartbeatJudge] = None

    def stop(self, code: int, reason: str) -> None:
        sys.stderr.write(f"[rank{self.rank}] error: {reason}; rank {self.rank} stops (exit {code}). Relaunch every "
                         "node's torchrun: train.resume=auto continues from the newest complete checkpoint.\n")
        sys.stderr.flush()
        self.exit_fn(code)

    def run(self) -> None:
        last_reached = next_store_poll = time.monotonic()
        while True:
            if os.getppid() != self.agent_pid:
                self.stop(EXIT_AGENT_LOST, f"this worker's torchrun agent (pid {self.agent_pid}) is gone (killed, or "
                          "its node lost), so this worker stops too instead of training on as an orphan")
                return
            if process_state(self.agent_pid) == "Z":
                self.stop(EXIT_AGENT_LOST, f"this worker's torchrun agent (pid {self.agent_pid}) is defunct (its main "
                          "thread ended while another thread lives on: it no longer watches its workers), so this "
                          "worker stops instead of training on unwatched")
                return
            if self.watch_nodes and time.monotonic() >= next_store_poll:
                next_store_poll = time.monotonic() + self.settings.poll_interval_s
                try:
                    if self._poll_store():
                        return
                    last_reached = time.monotonic()
                except (RuntimeError, TimeoutError, OSError) as err:  # DistNetworkError, DistStoreError
                    self.store = None  # reconnect next time
                    unreachable_s = time.monotonic() - last_reached
                    if unreachable_s > self.settings.lost_after_s:
                        detail = str(err).splitlines()[0] if str(err) else ""
                        self.stop(EXIT_NODE_LOST, (
                            f"node {self.node_rank} cannot reach torchrun's store on node 0 ({self.address[0]}:"
                            f"{self.address[1]}) for {unreachable_s:.0f} s: node 0 is lost or the network is cut "
                            f"({type(err).__name__}: {detail})"))
                        return
            time.sleep(min(self.settings.agent_poll_interval_s, self.settings.poll_interval_s))

    def _poll_store(self) -> bool:
        """Beat, look for a ``lost`` note, judge (node 0); True when this worker was stopped."""
        if self.store is None:
            self.store = dist.TCPStore(host_name=self.address[0], port=self.address[1], is_master=False,
                                       timeout=timedelta(seconds=self.settings.store_timeout_s))
        store = self.store
        if self.local_rank == 0:
            store.add(f"{self.prefix}/beat/{self.node_rank}", 1)
        lost_key = f"{self.prefix}/lost"
        if store.check([lost_key]):
            self.stop(EXIT_NODE_LOST, store.get(lost_key).decode())
            return True
        if self.node_rank != 0 or self.local_rank != 0:
            return False
        now = time.monotonic()
        if self.judge is None:
            self.judge = HeartbeatJudge(list(range(1, self.num_nodes)), now=now,
                                        lost_after_s=self.settings.lost_after_s,
                                        start_grace_s=self.settings.start_grace_s)
        for node in range(1, self.num_nodes):
            reason = self.judge.observe(node, store.add(f"{self.prefix}/beat/{node}", 0), now=now)
            if reason:
                reason = f"{reason}; node 0 ({socket.gethostname()}) stops the job"
                store.set(lost_key, reason)  # every other node's workers read it and stop
                self.stop(EXIT_NODE_LOST, reason)
                return True
        return False


def process_state(pid: int) -> Optional[str]:
    """The state letter of process ``pid`` from ``/proc/<pid>/stat`` (``R``, ``S``, ``Z`` for a defunct
    thread-group leader, ...), or None where it cannot be read (no such process, no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 1:].split()  # the name in parentheses may hold spaces and ")"
    return fields[0] if fields else None


def start_node_watch(settings: Optional[NodeWatchSettings] = None, *,
                     env: Optional[Mapping[str, str]] = None) -> Optional[threading.Thread]:
    """Start the watch thread of this torchrun worker (see the module docstring).

    Args:
        settings: default ``NodeWatchSettings.from_env(env)``.
        env: default ``os.environ``.

    Returns:
        The daemon thread, or None when this process is not a torchrun worker (no ``TORCHELASTIC_RUN_ID``).

    Raises:
        ValueError: ``LONGCAT_NODE_LOST_AFTER_S`` is not a number >= 0.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    watch = NodeWatch(settings or NodeWatchSettings.from_env(env), env, exit_fn=os._exit)
    thread = threading.Thread(target=watch.run, name="longcat-node-watch", daemon=True)
    thread.start()
    return thread
