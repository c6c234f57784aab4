"""The rendezvous store of a torchrun worker: safe across restarts, and reachable or a clear error.

Restarts. torchrun (torch >= 2.4) shares its agent's TCPStore with the workers
(``TORCHELASTIC_USE_AGENT_STORE``) and keeps that store across restarts of the worker group.
``init_process_group(env://)`` uses it without a per-restart prefix, so a restarted group reads the
keys its killed predecessors wrote: gloo then dials a dead rank's address ("connectFullMesh failed
... Connection refused", see pytorch/pytorch#167288) and every restart fails. Prefixing the store
with the restart count gives each generation its own keys.

Name resolution. Node 0's agent publishes its host name (``socket.getfqdn()``, or ``--local-addr``)
as ``MASTER_ADDR``. Where that name does not lead to node 0 from the other nodes (it resolves to
127.0.0.1 there, or to an address they cannot reach), their workers used to retry the connection for
the whole 10-minute timeout, silently. ``restart_safe_store`` now fails within 5 s on a loopback
address that does not answer on another node (it may answer: several "nodes" on one machine), and
after ``connect_timeout`` otherwise, with the fix in the message.

The death of an agent or of a whole node is watched by ``longcat.distributed.node_watch``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

__all__ = ["restart_safe_store"]

_LOOPBACK_TRY = timedelta(seconds=5)
_FIX_NAMES = ("Give every node's torchrun --local-addr=<that node's address on the cluster network> (and "
              "--rdzv-conf is_host=true on the node at --rdzv-endpoint, is_host=false on the others), or make "
              "the host names resolve to those addresses on every node; see README.md, 'Several nodes'")


def restart_safe_store(*, timeout: timedelta, connect_timeout: timedelta = timedelta(seconds=60)
                       ) -> Optional[dist.Store]:
    """torchrun's shared store under ``longcat/attempt_<TORCHELASTIC_RESTART_COUNT>/``, or None when
    the worker was not started by a torchrun agent that shares its store (then ``env://`` is fine).

    Args:
        timeout: the store's timeout for its operations once connected.
        connect_timeout: how long to keep trying to reach the store (node 0's agent has it up
            before any worker starts, so a longer wait means a name or network problem).

    Raises:
        ValueError: ``MASTER_ADDR`` cannot be reached from this node (within 5 s when it is a loopback
            address on a node other than node 0, else within ``connect_timeout``): names the address
            and the torchrun settings that fix it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    node_rank = int(os.environ.get("GROUP_RANK", "0"))
    addresses = _resolve(host)
    # On another node a loopback MASTER_ADDR is wrong unless the "nodes" share one machine: try briefly.
    loopback = node_rank != 0 and bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    try:
        store = dist.TCPStore(host_name=host, port=port, is_master=False,
                              timeout=min(connect_timeout, _LOOPBACK_TRY) if loopback else connect_timeout)
    except (RuntimeError, TimeoutError) as err:  # DistNetworkError / DistStoreError
        if loopback:
            raise ValueError(
                f"node {node_rank}: torchrun's store is on node 0, but MASTER_ADDR={host!r} (node 0's host name as "
                f"its agent published it) resolves to {sorted(addresses)} here, a loopback address, and nothing "
                "answers there. " + _FIX_NAMES) from None
        raise ValueError(
            f"node {node_rank}: cannot reach torchrun's store at MASTER_ADDR={host!r} (resolves to "
            f"{sorted(addresses) or 'nothing'}) port {port} within {connect_timeout.total_seconds():.0f} s "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). " + _FIX_NAMES) from None
    store.set_timeout(timeout)
    return dist.PrefixStore(f"longcat/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _resolve(host: str) -> set[str]:
    try:
        # an IPv4 / IPv6 sockaddr's first item is the address string (typeshed allows int for other families)
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()
