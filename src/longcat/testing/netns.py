"""Two "machines" on one host: network namespaces joined by a veth pair.

``VethLink`` makes namespaces ``NAME_0`` and ``NAME_1``, one veth end in each with its /30 address,
loopback up, and optionally ``tc tbf`` shaping each end to ``rate_mbit``. Processes run inside a
namespace through ``exec_prefix(i)`` (``ip netns exec NAME_i``; the caller's environment is kept).
Only the two addresses given are ever assigned; the host's own interfaces are untouched.

``close()`` (also the context manager's exit) SIGKILLs whatever still runs inside the namespaces
(processes the caller started there, e.g. orphaned workers of a killed launcher), then deletes the
namespaces (their veth ends go with them) and a veth end left in the host namespace. It is
idempotent, so tests call it from a fixture finalizer as well.

Needs CAP_NET_ADMIN (root) and ``ip`` (iproute2); ``available()`` says whether this host allows it.
Used by the ScMoE overlap benchmark (``longcat.bench.overlap``, shaped link) and the multi-node
test (``tests/integration/test_multinode.py``, two torchrun "nodes").

Example::

    with VethLink(addresses=("10.201.0.1", "10.201.0.2"), tag="mn123") as link:
        subprocess.run([*link.exec_prefix(1), "ping", "-c1", link.addresses[0]], check=True)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Optional, Sequence

__all__ = ["VethLink", "available"]


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available() -> tuple[bool, str]:
    """(True, "") when network namespaces can be made here, else (False, why)."""
    if shutil.which("ip") is None:
        return False, "the ip command (iproute2) is not installed"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return False, "network namespaces need root (CAP_NET_ADMIN)"
    probe = f"lcprobe{os.getpid()}"
    try:
        _sh("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as err:
        return False, f"ip netns add failed: {err.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


class VethLink:
    """Two namespaces joined by a veth pair; a context manager that deletes them on exit.

    Args:
        rate_mbit: shape each end to this rate with ``tc tbf`` (None: unshaped).
        tag: names the namespaces (``lcov{tag}_0/1``, or ``{prefix}{tag}_0/1``) and devices; default
            this process's pid. Two live links need different tags.
        addresses: (end 0, end 1) IPv4 addresses, each a /30 on its end. Default ``10.200.{tag % 64}.1/.2``
            (the benchmark's).
        prefix: namespace name prefix.

    Attributes: ``namespaces`` and ``devices`` (per end), ``addresses`` (per end, no prefix length).

    Raises:
        PermissionError: (on ``__enter__``) the namespaces or the link cannot be made here; the
            partial setup is removed.
    """

    def __init__(self, rate_mbit: Optional[float] = None, *, tag: Optional[str] = None,
                 addresses: Optional[Sequence[str]] = None, prefix: str = "lcov") -> None:
        tag = tag or str(os.getpid())
        subnet = int(tag) % 64 if tag.isdigit() else 0
        self.rate_mbit = rate_mbit
        self.namespaces = (f"{prefix}{tag}_0", f"{prefix}{tag}_1")
        self.devices = (f"lcv{tag}_0"[-15:], f"lcv{tag}_1"[-15:])
        self.addresses = tuple(addresses) if addresses else (f"10.200.{subnet}.1", f"10.200.{subnet}.2")
        if len(self.addresses) != 2:
            raise ValueError(f"addresses={addresses!r}: give exactly two, one per end")

    def __enter__(self) -> VethLink:
        try:
            for ns in self.namespaces:
                _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", self.devices[0], "type", "veth", "peer", "name", self.devices[1])
            for ns, dev, addr in zip(self.namespaces, self.devices, self.addresses):
                _sh("ip", "link", "set", dev, "netns", ns)
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                if self.rate_mbit is not None:
                    burst_bytes = max(128 * 1024, int(self.rate_mbit * 1e6 / 8 / 500))  # >= 2 ms at the rate
                    _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                        "rate", f"{self.rate_mbit}mbit", "burst", str(burst_bytes), "latency", "200ms")
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            self.close()
            detail = getattr(err, "stderr", "") or str(err)
            raise PermissionError(f"cannot build the veth link: {detail.strip()}") from err
        return self

    def exec_prefix(self, end: int) -> list[str]:
        """The argv prefix that runs a command inside namespace ``end`` (environment kept)."""
        return ["ip", "netns", "exec", self.namespaces[end]]

    def set_up(self, end: int, up: bool) -> None:
        """Bring ``end``'s veth device down (a cut cable: packets vanish, no RST) or back up."""
        _sh("ip", "-n", self.namespaces[end], "link", "set", self.devices[end], "up" if up else "down")

    def pids(self, end: int) -> list[int]:
        """Processes running inside namespace ``end`` (empty when it does not exist)."""
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[end]], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()] if out.returncode == 0 else []

    def kill_all(self, end: int) -> list[int]:
        """SIGKILL every process inside namespace ``end`` (a node's power cut); returns their pids."""
        pids = self.pids(end)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def close(self) -> None:
        """Kill what runs inside, delete both namespaces and a veth end left here (idempotent)."""
        for end, ns in enumerate(self.namespaces):
            self.kill_all(end)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.devices[0]], capture_output=True)

    def __exit__(self, *exc) -> None:
        self.close()
