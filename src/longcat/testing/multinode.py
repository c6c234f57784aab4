"""A multi-node training run on one host: one torchrun per network namespace, as README.md says.

``TorchrunNodes.launch`` starts, in namespace ``i`` of a ``VethLink``, the README's multi-node
command for node ``i``::

    torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint ADDR0:PORT --rdzv-id ID \
        --rdzv-conf is_host=true|false --local-addr ADDRi -m longcat.train OVERRIDES

with ``GLOO_SOCKET_IFNAME`` set to that namespace's veth end (``--local-addr`` and ``is_host``: the
host name of this machine does not resolve to the namespaces' addresses, see the README). Each
node's output goes to ``log_dir/node<i>.log``.

Example::

    with VethLink(addresses=("10.201.0.1", "10.201.0.2"), prefix="lcmn") as link:
        nodes = TorchrunNodes.launch(link, [overrides, overrides], log_dir=tmp, port=29500)
        nodes.kill_agent(1)                 # SIGKILL node 1's torchrun
        codes = nodes.wait(timeout_s=60)    # both ended by themselves
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from longcat.testing.jobs import worker_env
from longcat.testing.netns import VethLink

__all__ = ["TorchrunNodes", "node_command"]


def node_command(link: VethLink, node: int, overrides: Sequence[str], *, port: int, rdzv_id: str,
                 nproc_per_node: int = 1) -> list[str]:
    """The README's multi-node torchrun command for ``node``, run inside its namespace."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [*link.exec_prefix(node), torchrun, "--nnodes", str(len(link.namespaces)),
            "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{link.addresses[0]}:{port}", "--rdzv-id", rdzv_id,
            "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "--local-addr", link.addresses[node],
            "-m", "longcat.train", *overrides]


class TorchrunNodes:
    """The torchrun agents of one launch, one per node (namespace); see the module docstring."""

    def __init__(self, link: VethLink, procs: list[subprocess.Popen], log_paths: list[Path]):
        self.link, self.procs, self.log_paths = link, procs, log_paths

    @classmethod
    def launch(cls, link: VethLink, overrides: Sequence[Sequence[str]], *, log_dir: Path, port: int,
               rdzv_id: str = "longcat-test", nproc_per_node: int = 1,
               env: Optional[Mapping[str, str]] = None) -> TorchrunNodes:
        """Start node ``i`` with ``overrides[i]`` (one list per namespace of ``link``)."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        procs, log_paths = [], []
        for node, node_overrides in enumerate(overrides):
            log_path = log_dir / f"node{node}.log"
            node_env = worker_env({**(env or {}), "GLOO_SOCKET_IFNAME": link.devices[node]})
            cmd = node_command(link, node, node_overrides, port=port, rdzv_id=rdzv_id,
                               nproc_per_node=nproc_per_node)
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=node_env,
                                              start_new_session=True))
            log_paths.append(log_path)
        return cls(link, procs, log_paths)

    def running(self) -> list[bool]:
        return [proc.poll() is None for proc in self.procs]

    def kill_agent(self, node: int) -> None:
        """SIGKILL node ``node``'s torchrun (``ip netns exec`` execs it: same pid); its workers are
        left to notice by themselves, as after a real kill of the agent."""
        os.kill(self.procs[node].pid, signal.SIGKILL)

    def wait(self, timeout_s: float, *, nodes: Optional[Sequence[int]] = None) -> list[Optional[int]]:
        """Exit codes of ``nodes`` (default all) once they have exited; on timeout every process of
        the launch is killed and TimeoutError raised with the logs' tails."""
        deadline = time.monotonic() + timeout_s
        nodes = range(len(self.procs)) if nodes is None else nodes
        for node in nodes:
            try:
                self.procs[node].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                raise TimeoutError(f"node {node} did not exit within {timeout_s} s:\n"
                                   + self.log(node)[-3000:]) from None
        return [self.procs[node].returncode for node in range(len(self.procs))]

    def kill_all(self) -> None:
        """SIGKILL every agent and every process left in the namespaces (idempotent)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for end in range(len(self.link.namespaces)):
            self.link.kill_all(end)
        for proc in self.procs:
            proc.wait()

    def log(self, node: int) -> str:
        path = self.log_paths[node]
        return path.read_text(errors="replace") if path.exists() else ""
