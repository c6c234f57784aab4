"""Start-up check that ``train.out_dir`` is one folder shared by every rank.

A checkpoint is written by every rank into ``out_dir/checkpoints/step_N.tmp`` and renamed into place by
rank 0 once all ranks agree that their parts are written. When each node has its own ``out_dir``
(node-local disks, a path that is mounted on one node only), rank 0 renames a folder that lacks
the other nodes' shards (their experts under ep > 1) and their RNG states, the other nodes keep
``step_N.tmp`` folders forever, and the run reports success: every checkpoint is unresumable.

``check_shared_out_dir`` finds this before any work: rank 0 writes a token file unique to this
launch into ``out_dir``; once it has (a broadcast from rank 0 over ``group``), every rank reads it
back, the ranks exchange whether they could (an all-reduce), and if any rank could not, every rank
raises the same ``ValueError`` naming the folder and the ranks. Rank 0 then removes the token file.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path
from typing import Union

import torch
import torch.distributed as dist

__all__ = ["check_shared_out_dir", "token_path"]

_TOKEN_PREFIX = ".longcat-shared-check-"


def token_path(out_dir: Union[str, Path], token: int) -> Path:
    """The token file of one launch: ``out_dir/.longcat-shared-check-<token hex>``."""
    return Path(out_dir) / f"{_TOKEN_PREFIX}{token:016x}"


def _write_token(out_dir: Path, token: int) -> str:
    """Rank 0: write the token file; '' on success, else the error text."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = token_path(out_dir, token)
        with open(path, "w") as f:
            f.write(f"{token:016x}\n")
            f.flush()
            os.fsync(f.fileno())  # a shared file system shows other clients what was synced
        return ""
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def _sees_token(out_dir: Path, token: int, *, retry_s: float) -> bool:
    """Whether the token file is there with this launch's token; retried for ``retry_s`` seconds
    (attribute caches of network file systems may lag a moment behind the writer)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            if token_path(out_dir, token).read_text().strip() == f"{token:016x}":
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_shared_out_dir(out_dir: Union[str, Path], *, group: dist.ProcessGroup, rank: int,
                         retry_s: float = 2.0) -> None:
    """Check that ``out_dir`` is the same folder on every rank of ``group``. Collective over ``group``.

    Args:
        out_dir: ``train.out_dir`` as this rank sees it (the paths may be equal and still be
            different folders: node-local disks).
        group: the world group (every rank that writes checkpoints); a CPU-capable group (gloo, or
            a ``cpu:gloo,cuda:nccl`` default group). A size-1 group returns at once.
        rank: this process's rank in ``group``; rank 0 writes the token.
        retry_s: how long a rank keeps looking for the token before it reports that it cannot see it.

    Raises:
        ValueError: on every rank alike, when rank 0 could not write the token file or some rank
            could not read it: names the folder and the ranks, and says that checkpoints need a
            folder shared by all nodes.
    """
    world_size = group.size()
    if world_size == 1:
        return
    out_dir = Path(out_dir)
    # [2] int64: (token, rank 0 wrote it) -> broadcast(group, from rank 0) -> the same on every rank
    header = torch.zeros(2, dtype=torch.int64)
    write_error = ""
    if rank == 0:
        header[0] = secrets.randbits(62) + 1  # unique per launch: a stale file of an earlier launch never counts
        write_error = _write_token(out_dir, int(header[0]))
        header[1] = int(not write_error)
    dist.broadcast(header, group=group, group_src=0)
    token, written = int(header[0]), bool(header[1])
    # [world_size] int64, 1 where that rank cannot see the token -> all_reduce(SUM, group) -> same
    missing = torch.zeros(world_size, dtype=torch.int64)
    if written:
        missing[rank] = int(not _sees_token(out_dir, token, retry_s=retry_s))
    dist.all_reduce(missing, group=group)
    if rank == 0 and written:
        try:
            token_path(out_dir, token).unlink()
        except OSError:
            pass
    if not written:
        raise ValueError(
            f"rank 0 could not write into train.out_dir {out_dir} ({write_error or 'see rank 0'}): make it a "
            "writable folder shared by all nodes")
    blind = [r for r in range(world_size) if missing[r]]
    if blind:
        here = f" (this is rank {rank} on host {socket.gethostname()})" if rank in blind else ""
        raise ValueError(
            f"train.out_dir {out_dir} is not one folder shared by all ranks: rank(s) {blind} could not see "
            f"the file rank 0 wrote into it{here}. Checkpoints need a folder shared by all nodes (every rank "
            "writes its own shards into it and rank 0 completes the checkpoint): set train.out_dir to a "
            "shared file system path (e.g. NFS or Lustre) mounted at the same path on every node")
