"""ParallelDims validation messages and the pure rank layout (no process groups)."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from longcat.distributed import ParallelDims, rank_layout

LAYOUTS = [
    dict(world_size=1),
    dict(world_size=8, tp=2, ep=4),
    dict(world_size=16, tp=2, pp=2, ep=2),
    dict(world_size=24, tp=2, pp=3, ep=4),
    dict(world_size=32, tp=4, pp=2, dp=4, ep=16),
    dict(world_size=12, tp=3, ep=6),
    dict(world_size=8, cp=2, ep=4),
    dict(world_size=16, tp=2, cp=2, pp=2, ep=2),
    dict(world_size=64, pp=2, cp=8, ep=32),  # LongCat-Flash: EP=32 folds CP=8 x DP=4 in each stage
]
GROUPS = ("tp", "dp", "pp", "ep", "edp", "cp", "dp_cp")


def _dims(kw):
    kw = dict(kw)
    return ParallelDims(kw.pop("world_size"), **kw)


def test_dp_is_inferred_and_edp_derived():
    dims = ParallelDims(1024, tp=4, pp=8, ep=32)
    assert (dims.dp, dims.edp, dims.stage_size) == (32, 4, 128)
    assert dims.dense_mesh_shape == (8, 32, 1, 4) and dims.expert_mesh_shape == (8, 4, 32)
    assert dims.tp_enabled and dims.pp_enabled and dims.dp_enabled and dims.ep_enabled and dims.edp_enabled
    assert not ParallelDims(1).tp_enabled


def test_context_parallel_folds_into_the_expert_group():
    """The paper's layout: attention under CP=8 with no TP, EP=32 = CP=8 x DP=4 inside a stage."""
    dims = ParallelDims(2048, pp=16, cp=8, ep=32)
    assert (dims.dp, dims.stage_size, dims.edp, dims.dp_cp) == (16, 128, 4, 128)
    assert dims.dense_mesh_shape == (16, 16, 8, 1) and dims.expert_mesh_shape == (16, 4, 32)
    assert dims.cp_enabled and not ParallelDims(8).cp_enabled
    lay = rank_layout(dims, 37)
    assert lay.cp_ranks == tuple(range(32, 40)) and lay.ep_ranks == tuple(range(32, 64))
    assert set(lay.cp_ranks) <= set(lay.ep_ranks)  # the cp group sits inside the ep group


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelDims(8).tp = 2


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(tp=2, pp=2, dp=3), ["world_size=16", "pp*dp*tp = 2*3*2 = 12", "dp=4", "dp=-1"]),
        (dict(tp=3), ["world_size=16", "not divisible by pp*tp=3", "choose pp and tp"]),
        (dict(tp=2, ep=3), ["ep=3", "dp*tp=16", "choose ep in [1, 2, 4, 8, 16]"]),
        (dict(tp=0), ["tp=0", ">= 1"]),
        (dict(cp=32), ["parallel.cp=32 is larger than the world size 16", "[1, 2, 4, 8, 16]"]),
        (dict(cp=3), ["not divisible by pp*cp*tp=3", "choose pp, cp and tp"]),
        (dict(cp=2, ep=32), ["ep=32", "dp*cp*tp=16", "[1, 2, 4, 8, 16]"]),
        (dict(cp=2, dp=3), ["pp*dp*cp*tp = 1*3*2*1 = 6", "dp=8"]),
        (dict(dp=0), ["dp=0", "-1 to infer"]),
    ],
)
def test_invalid_layouts_name_numbers_and_fix(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        ParallelDims(16, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "model, fragments",
    [
        (
            dict(num_attention_heads=6, n_routed_experts=8, num_layers=4),
            ["num_attention_heads=6", "tp=4", "[1, 2, 3, 6]"],
        ),
        (dict(num_attention_heads=8, n_routed_experts=6, num_layers=4), ["n_routed_experts=6", "ep=4", "[1, 2]"]),
        (
            dict(num_attention_heads=8, n_routed_experts=8, num_layers=5),
            ["num_layers=5", "2 pipeline stages", "multiple of 2"],
        ),
        (dict(num_attention_heads=8, n_routed_experts=8, num_layers=4, num_stages=3), ["num_stages=3", "pp=2"]),
    ],
)
def test_check_model_errors(model, fragments):
    dims = ParallelDims(16, tp=4, pp=2, ep=4)
    with pytest.raises(ValueError) as info:
        dims.check_model(**model)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_check_model_accepts_even_splits():
    ParallelDims(16, tp=4, pp=2, ep=4).check_model(
        num_attention_heads=8, n_routed_experts=8, num_layers=8, num_stages=4
    )


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_every_group_type_partitions_the_ranks(kw):
    dims = _dims(kw)
    layouts = [rank_layout(dims, r) for r in range(dims.world_size)]
    sizes = dict(tp=dims.tp, dp=dims.dp, pp=dims.pp, ep=dims.ep, edp=dims.edp, cp=dims.cp, dp_cp=dims.dp * dims.cp)
    for name in GROUPS:
        groups = {getattr(lay, f"{name}_ranks") for lay in layouts}
        members = sorted(r for g in groups for r in g)
        assert members == list(range(dims.world_size)), f"{name} groups do not cover every rank once"
        assert all(len(g) == sizes[name] for g in groups)
        for lay in layouts:
            ranks = getattr(lay, f"{name}_ranks")
            assert ranks[getattr(lay, f"{name}_rank")] == lay.rank  # ordered by group rank


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_megatron_order_and_moe_folding(kw):
    dims = _dims(kw)
    for r in range(dims.world_size):
        lay = rank_layout(dims, r)
        # tp fastest, then cp, dp; pp outermost
        assert r == ((lay.pp_rank * dims.dp + lay.dp_rank) * dims.cp + lay.cp_rank) * dims.tp + lay.tp_rank
        assert r == lay.pp_rank * dims.stage_size + lay.edp_rank * dims.ep + lay.ep_rank  # edp x ep in stage
        assert list(lay.tp_ranks) == list(range(lay.tp_ranks[0], lay.tp_ranks[0] + dims.tp))  # contiguous
        assert list(lay.ep_ranks) == list(range(lay.ep_ranks[0], lay.ep_ranks[0] + dims.ep))  # contiguous
        stage = range(lay.pp_rank * dims.stage_size, (lay.pp_rank + 1) * dims.stage_size)
        for name in ("tp", "dp", "ep", "edp", "cp", "dp_cp"):
            assert all(m in stage for m in getattr(lay, f"{name}_ranks")), f"{name} group leaves its stage"
        assert len({rank_layout(dims, m).pp_rank for m in lay.pp_ranks}) == dims.pp


def test_example_layout():
    lay = rank_layout(ParallelDims(16, tp=2, pp=2, ep=4), 13)
    assert (lay.pp_rank, lay.dp_rank, lay.tp_rank, lay.edp_rank, lay.ep_rank) == (1, 2, 1, 1, 1)
    assert lay.tp_ranks == (12, 13) and lay.dp_ranks == (9, 11, 13, 15) and lay.pp_ranks == (5, 13)
    assert lay.ep_ranks == (12, 13, 14, 15) and lay.edp_ranks == (9, 13)


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="rank=8 is outside"):
        rank_layout(ParallelDims(8), 8)


def _plan_layout_tool():
    path = Path(__file__).resolve().parents[3] / "tools" / "plan_layout.py"
    spec = importlib.util.spec_from_file_location("plan_layout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_layout_tool(capsys):
    tool = _plan_layout_tool()
    assert tool.main(["--world-size", "1024", "--tp", "4", "--pp", "8", "--ep", "32", "--rank", "37"]) == 0
    out = capsys.readouterr().out
    assert "dp=32" in out and "rank 37: pp=0 dp=9 cp=0 tp=1 | edp=1 ep=5" in out and "[36..39]" in out
    assert tool.main(["--world-size", "1024", "--tp", "4", "--pp", "8", "--ep", "24"]) == 2
    assert "ep=24 must divide dp*tp=128" in capsys.readouterr().err
    assert tool.main(["--world-size", "2048", "--pp", "16", "--cp", "8", "--ep", "32", "--rank", "37"]) == 0
    out = capsys.readouterr().out
    assert "rank 37: pp=0 dp=4 cp=5 tp=0 | edp=1 ep=5" in out and "cp group: [32..39] (8 ranks)" in out
    assert "dense mesh (pp, dp, cp, tp) = (16, 16, 8, 1)" in out
