"""Multi-process gloo tests of ProcessGroups and the collectives, plus the harness's own failure modes.

Each rank builds the whole (tiny) global problem from fixed seeds, computes the single-process
reference locally, and checks its own shard of the distributed result, forward and backward.
Rank bodies are module-level functions so that spawn can pickle them.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist

from longcat.distributed import (
    ParallelDims,
    ProcessGroups,
    all_gather_along,
    all_reduce_sum,
    all_to_all_uneven,
    copy_to_group,
    exchange_counts,
    gather_from_group,
    rank_layout,
    reduce_scatter_along,
    split_to_group,
)
from longcat.testing import (
    DistributedTestError,
    DistributedTimeoutError,
    distributed_test,
    run_distributed,
)

TIMEOUT_S = 60
GROUP_NAMES = ("tp", "dp", "pp", "ep", "edp", "cp")


def _seeded(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------- groups


def _groups_body(layouts):
    seen = []
    for kwargs in layouts:
        dims = ParallelDims(dist.get_world_size(), **kwargs)
        groups = ProcessGroups.build(dims)
        expected = rank_layout(dims, dist.get_rank())
        assert groups.layout == expected
        for name in GROUP_NAMES:
            group = getattr(groups, f"{name}_group")
            assert tuple(dist.get_process_group_ranks(group)) == getattr(expected, f"{name}_ranks"), name
            assert group.rank() == getattr(groups, f"{name}_rank") == getattr(expected, f"{name}_rank"), name
            assert group.size() == getattr(groups, f"{name}_size"), name
        assert tuple(dist.get_process_group_ranks(groups.dp_cp_group)) == expected.dp_cp_ranks
        assert groups.dp_cp_mesh is not None and groups.dp_cp_mesh.get_group() is groups.dp_cp_group
        assert groups.dense_mesh.mesh_dim_names == ("pp", "dp", "cp", "tp")
        assert groups.expert_mesh.mesh_dim_names == ("pp", "edp", "ep")
        assert groups.world_group.size() == dims.world_size
        # A collective on a built group really reduces over exactly its members.
        x = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(x, group=groups.ep_group)
        assert x.item() == sum(expected.ep_ranks)
        seen.append(expected.ep_ranks)
    return dist.get_rank(), seen


@pytest.mark.parametrize(
    "world_size, layouts",
    [
        (2, [dict(tp=2), dict(ep=2), dict(pp=2), dict(tp=2, ep=2), dict(cp=2), dict(cp=2, ep=2)]),
        (4, [dict(tp=2, ep=4), dict(tp=2, pp=2, ep=2), dict(pp=2, ep=1), dict(ep=2), dict(cp=2, ep=4),
             dict(dp=2, cp=2), dict(tp=2, cp=2, ep=2), dict(pp=2, cp=2, ep=2)]),
    ],
)
def test_mesh_groups_match_rank_layout(world_size, layouts):
    results = run_distributed(_groups_body, world_size=world_size, args=(layouts,), timeout_s=TIMEOUT_S)
    assert [rank for rank, _ in results] == list(range(world_size))  # results come back by rank


# ----------------------------------------------------------------------------------- EP


def _counts_matrix(pattern, size, num_experts):
    """``[G, E]`` tokens each source rank routes to each global expert."""
    counts = torch.randint(0, 4, (size, num_experts), generator=torch.Generator().manual_seed(7))
    if pattern == "edge":
        local = num_experts // size
        counts[:, (size - 1) * local :] = 0  # the last rank receives nothing
        counts[size - 1, :] = 0  # ... and sends nothing: its input has zero rows
        counts[0, local : 2 * local] = 0  # rank 0 sends zero rows to rank 1
        counts[0, 0] = max(int(counts[0, 0]), 1)  # someone still sends something
    return counts


def _ep_body(pattern):
    dims = ParallelDims(dist.get_world_size(), ep=dist.get_world_size())
    groups = ProcessGroups.build(dims)
    size, me, num_experts, hidden = groups.ep_size, groups.ep_rank, 2 * groups.ep_size, 3
    counts_GE = _counts_matrix(pattern, size, num_experts)
    sent_GG = counts_GE.view(size, size, -1).sum(-1)  # [src, dst] rows

    # Reference on every rank: the global graph of all ranks' inputs and outputs.
    inputs = [_seeded(int(sent_GG[i].sum()), hidden, seed=100 + i).requires_grad_() for i in range(size)]
    pieces = [torch.split(inputs[i], sent_GG[i].tolist()) for i in range(size)]
    outputs = [torch.cat([pieces[i][j] for i in range(size)]) for j in range(size)]
    weights = [_seeded(out.shape[0], hidden, seed=200 + j) for j, out in enumerate(outputs)]
    sum((out * w).sum() for out, w in zip(outputs, weights)).backward()

    exchanged = exchange_counts(counts_GE[me], group=groups.ep_group)
    local = num_experts // size
    assert torch.equal(exchanged.received_GE, counts_GE[:, me * local : (me + 1) * local])
    assert exchanged.input_splits == sent_GG[me].tolist()
    assert exchanged.output_splits == sent_GG[:, me].tolist()

    x_TD = inputs[me].detach().clone().requires_grad_()
    out_RD = all_to_all_uneven(
        x_TD, input_splits=exchanged.input_splits, output_splits=exchanged.output_splits, group=groups.ep_group
    )
    (out_RD * weights[me]).sum().backward()
    assert torch.equal(out_RD.detach(), outputs[me].detach())
    assert torch.equal(x_TD.grad, inputs[me].grad)

    # Async: same bits, with unrelated compute while the exchange is in flight.
    x2_TD = inputs[me].detach().clone().requires_grad_()
    handle = all_to_all_uneven(
        x2_TD,
        input_splits=exchanged.input_splits,
        output_splits=exchanged.output_splits,
        group=groups.ep_group,
        async_op=True,
    )
    busy = _seeded(64, 64, seed=1) @ _seeded(64, 64, seed=2)
    out2_RD = handle.wait()
    assert handle.is_completed() and busy.shape == (64, 64)
    (out2_RD * weights[me]).sum().backward()
    assert torch.equal(out2_RD.detach(), out_RD.detach())
    assert torch.equal(x2_TD.grad, x_TD.grad)
    return out_RD.shape[0], x_TD.shape[0]


@pytest.mark.parametrize("world_size, pattern", [(2, "random"), (2, "edge"), (4, "random"), (4, "edge")])
def test_all_to_all_uneven_matches_reference(world_size, pattern):
    rows = run_distributed(_ep_body, world_size=world_size, args=(pattern,), timeout_s=TIMEOUT_S)
    if pattern == "edge":
        assert rows[-1] == (0, 0)  # the last rank really received and sent nothing


# ----------------------------------------------------------------------------------- TP / SP


def _tp_body():
    dims = ParallelDims(dist.get_world_size(), tp=dist.get_world_size())
    groups = ProcessGroups.build(dims)
    tp, me, group = groups.tp_size, groups.tp_rank, groups.tp_group
    seq, hidden, ffn = 2 * tp, 4, 3 * tp
    x_SD, w1_DF, w2_FD, gy_SD = (
        _seeded(seq, hidden, seed=1),
        _seeded(hidden, ffn, seed=2),
        _seeded(ffn, hidden, seed=3),
        _seeded(seq, hidden, seed=4),
    )
    cols = slice(me * ffn // tp, (me + 1) * ffn // tp)
    rows = slice(me * seq // tp, (me + 1) * seq // tp)

    ref = [t.clone().requires_grad_() for t in (x_SD, w1_DF, w2_FD)]
    y_ref = torch.relu(ref[0] @ ref[1]) @ ref[2]
    (y_ref * gy_SD).sum().backward()

    # Megatron TP: f -> column-parallel -> row-parallel -> g.
    x = x_SD.clone().requires_grad_()
    w1, w2 = w1_DF[:, cols].clone().requires_grad_(), w2_FD[cols].clone().requires_grad_()
    y = all_reduce_sum(torch.relu(copy_to_group(x, group=group) @ w1) @ w2, group=group)
    (y * gy_SD).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, ref[0].grad)
    torch.testing.assert_close(w1.grad, ref[1].grad[:, cols])
    torch.testing.assert_close(w2.grad, ref[2].grad[cols])

    # Sequence parallel: all-gather(seq) -> column -> row -> reduce-scatter(seq).
    xs = x_SD[rows].clone().requires_grad_()
    w1, w2 = w1_DF[:, cols].clone().requires_grad_(), w2_FD[cols].clone().requires_grad_()
    ys = reduce_scatter_along(torch.relu(all_gather_along(xs, dim=0, group=group) @ w1) @ w2, dim=0, group=group)
    (ys * gy_SD[rows]).sum().backward()
    torch.testing.assert_close(ys, y_ref[rows])
    torch.testing.assert_close(xs.grad, ref[0].grad[rows])
    torch.testing.assert_close(w1.grad, ref[1].grad[:, cols])

    # A non-leading dim, with rank-dependent inputs and gradients.
    parts = [_seeded(3, 2 * tp, seed=10 + r) for r in range(tp)]
    grads = [_seeded(3, 2, seed=20 + r) for r in range(tp)]
    p = parts[me].clone().requires_grad_()
    out = reduce_scatter_along(p, dim=-1, group=group)
    (out * grads[me]).sum().backward()
    torch.testing.assert_close(out, sum(parts)[:, 2 * me : 2 * me + 2])
    torch.testing.assert_close(p.grad, torch.cat(grads, dim=-1))
    q = parts[me][:, :2].clone().requires_grad_()
    gathered = all_gather_along(q, dim=1, group=group)
    (gathered * parts[0]).sum().backward()
    torch.testing.assert_close(gathered, torch.cat([t[:, :2] for t in parts], dim=1))
    torch.testing.assert_close(q.grad, tp * parts[0][:, 2 * me : 2 * me + 2])

    # A replicated tensor split over the group, worked on per chunk, gathered back (the MoE under
    # tp, SP's replicated consumers): the gradients equal the single-process ones, not tp times them.
    r = x_SD.clone().requires_grad_()
    chunk = split_to_group(r, dim=0, group=group)
    assert torch.equal(chunk.detach(), x_SD[rows])
    back = gather_from_group(torch.relu(chunk @ w1_DF), dim=0, group=group)
    (back * _seeded(seq, ffn, seed=5)).sum().backward()
    r_ref = x_SD.clone().requires_grad_()
    (torch.relu(r_ref @ w1_DF) * _seeded(seq, ffn, seed=5)).sum().backward()
    torch.testing.assert_close(back, torch.relu(x_SD @ w1_DF))
    torch.testing.assert_close(r.grad, r_ref.grad)
    with pytest.raises(ValueError, match="not divisible by the group size"):
        split_to_group(x_SD[:-1], dim=0, group=group)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_and_sp_ops_match_reference(world_size):
    run_distributed(_tp_body, world_size=world_size, timeout_s=TIMEOUT_S)


# ----------------------------------------------------------------------------------- size-1 groups


def test_size_one_groups_short_circuit_exactly():
    groups = ProcessGroups.single()  # no init_process_group
    assert not dist.is_initialized()
    assert groups.dense_mesh is None and groups.world_size == 1 and groups.tp_group.size() == 1
    x = torch.randn(4, 3, requires_grad=True)
    for op in (all_reduce_sum, copy_to_group):
        assert op(x, group=groups.tp_group) is x
    for op in (all_gather_along, reduce_scatter_along, split_to_group, gather_from_group):
        assert op(x, dim=0, group=groups.tp_group) is x
    assert all_to_all_uneven(x, input_splits=[4], output_splits=[4], group=groups.ep_group) is x
    assert all_to_all_uneven(x, input_splits=[4], output_splits=[4], group=groups.ep_group, async_op=True).wait() is x
    counts = exchange_counts(torch.tensor([2, 0, 2]), group=groups.ep_group)
    assert counts.input_splits == counts.output_splits == [4]
    with pytest.raises(ValueError, match=r"sum\(input_splits\)=3 != x.shape\[0\]=4"):
        all_to_all_uneven(x, input_splits=[3], output_splits=[3], group=groups.ep_group)
    with pytest.raises(ValueError, match="must both equal the group size 1"):
        all_to_all_uneven(x, input_splits=[2, 2], output_splits=[4], group=groups.ep_group)
    y = torch.ones(2)
    dist.all_reduce(y, group=groups.dp_group)  # the size-1 groups are real: plain collectives work
    assert torch.equal(y, torch.ones(2))


def test_build_without_process_group_fails_clearly():
    with pytest.raises(ValueError, match="ProcessGroups.single"):
        ProcessGroups.build(ParallelDims(2, tp=2))


# ----------------------------------------------------------------------------------- the harness


def _raise_on_rank1_while_rank0_blocks():
    if dist.get_rank() == 1:
        raise RuntimeError("boom from rank 1")
    dist.barrier()  # never completes: rank 1 is gone


def _deadlock():
    t = torch.zeros(1)
    if dist.get_rank() == 0:
        dist.all_reduce(t)
    else:
        dist.recv(t, src=0)  # mismatched collectives: both ranks wait forever


def _silent_exit_on_rank1():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_harness_reports_rank_exception_promptly():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank1_while_rank0_blocks, world_size=2, timeout_s=TIMEOUT_S)
    assert info.value.rank == 1
    assert "boom from rank 1" in info.value.rank_traceback and "_raise_on_rank1" in info.value.rank_traceback
    assert time.monotonic() - start < 20  # rank 0, stuck in a barrier, was killed


def test_harness_times_out_on_deadlock():
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError) as info:
        run_distributed(_deadlock, world_size=2, timeout_s=6)
    assert set(info.value.pending_ranks) == {0, 1}
    assert time.monotonic() - start < 20


def test_harness_reports_silent_death():
    with pytest.raises(DistributedTestError, match="exited with code 3") as info:
        run_distributed(_silent_exit_on_rank1, world_size=2, timeout_s=TIMEOUT_S)
    assert info.value.rank == 1


@distributed_test(world_size=2, timeout_s=TIMEOUT_S)
def test_distributed_test_decorator(scale=3):
    x = torch.tensor([float(dist.get_rank() + 1) * scale])
    dist.all_reduce(x)
    assert x.item() == 9.0
    assert os.environ["WORLD_SIZE"] == "2" and torch.get_num_threads() >= 1
