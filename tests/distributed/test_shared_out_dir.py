"""``check_shared_out_dir`` on 2 gloo ranks: one shared folder passes, per-rank folders (node-local
disks) fail on every rank with the folder and the rank named, and the token file never stays behind."""

from __future__ import annotations

import torch.distributed as dist

from longcat.testing import run_distributed
from longcat.train.shared_dir import check_shared_out_dir

TIMEOUT_S = 60


def _check(dirs: list[str]):
    """Run the check with rank r's ``out_dir = dirs[r]``; return None or the error message."""
    rank = dist.get_rank()
    try:
        check_shared_out_dir(dirs[rank], group=dist.group.WORLD, rank=rank, retry_s=0.2)
    except ValueError as err:
        return str(err)
    return None


def test_one_shared_folder_passes_and_leaves_nothing(tmp_path):
    shared = tmp_path / "out"  # rank 0 creates it
    assert run_distributed(_check, world_size=2, args=([str(shared)] * 2,), timeout_s=TIMEOUT_S) == [None, None]
    assert shared.is_dir() and list(shared.iterdir()) == []


def test_node_local_folders_fail_on_every_rank(tmp_path):
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    errors = run_distributed(_check, world_size=2, args=([str(d) for d in dirs],), timeout_s=TIMEOUT_S)
    for rank, error in enumerate(errors):
        assert error is not None, f"rank {rank} passed"
        assert f"train.out_dir {dirs[rank]} is not one folder shared by all ranks" in error
        assert "rank(s) [1] could not see" in error and "Checkpoints need a folder shared by all nodes" in error
    assert "this is rank 1 on host" in errors[1] and "this is rank" not in errors[0]
    assert list(dirs[0].iterdir()) == [] and not dirs[1].exists()


def test_a_folder_rank_0_cannot_make_fails_on_every_rank(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    errors = run_distributed(_check, world_size=2, args=([str(blocker / "out")] * 2,), timeout_s=TIMEOUT_S)
    for error in errors:
        assert error is not None and f"rank 0 could not write into train.out_dir {blocker / 'out'}" in error


def test_a_stale_token_of_an_earlier_launch_does_not_count(tmp_path):
    """Each launch draws a new token: a token file left in node 1's folder by a killed launch (say,
    from a time the folders were shared) does not make node 1 look like it shares rank 0's folder."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node1.mkdir()
    (node1 / ".longcat-shared-check-00000000000000ff").write_text("00000000000000ff\n")
    errors = run_distributed(_check, world_size=2, args=([str(node0), str(node1)],), timeout_s=TIMEOUT_S)
    assert all(error and "rank(s) [1] could not see" in error for error in errors)
