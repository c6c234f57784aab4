"""The rendezvous store of a torchrun worker, safe across ``torchrun --max-restarts`` restarts.

torchrun (torch >= 2.4) shares its agent's TCPStore with the workers (``TORCHELASTIC_USE_AGENT_STORE``)
and keeps that store across restarts of the worker group. ``init_process_group(env://)`` uses it
without a per-restart prefix, so a restarted group reads the keys its killed predecessors wrote:
gloo then dials a dead rank's address ("connectFullMesh failed ... Connection refused", see
pytorch/pytorch#167288) and every restart fails. Prefixing the store with the restart count gives
each generation its own keys.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch.distributed as dist


def restart_safe_store(*, timeout: timedelta) -> Optional[dist.Store]:
    """torchrun's shared store under ``longcat/attempt_<TORCHELASTIC_RESTART_COUNT>/``, or None when
    the worker was not started by a torchrun agent that shares its store (then ``env://`` is fine)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(host_name=os.environ["MASTER_ADDR"], port=int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"longcat/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
