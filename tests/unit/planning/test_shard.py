"""The dry run's shards: the real parallelize on the meta device under fake process groups."""

from __future__ import annotations

import pytest

from longcat.config.compose import compose_run_config
from longcat.model.params import count_parameters
from longcat.planning import build_rank_shard, dry_run
from longcat.planning.dry_run import model_totals
from longcat.planning.shard import param_kind

TINY = ["model=tiny"]


def _cfg(*overrides: str):
    cfg, _ = compose_run_config("pretrain", [*TINY, *overrides])
    return cfg


def test_single_rank_holds_the_whole_model():
    cfg = _cfg()
    shard = build_rank_shard(cfg, world_size=1, rank=0)
    assert shard.params.total == count_parameters(cfg.model).total == shard.model_params
    assert shard.local_layers == tuple(range(cfg.model.num_layers))
    assert shard.first_stage and shard.last_stage


def test_expert_shards_over_ep_add_up_to_the_model():
    cfg = _cfg("parallel.ep=4")
    shards = [build_rank_shard(cfg, world_size=4, rank=r) for r in range(4)]
    full = build_rank_shard(_cfg(), world_size=1, rank=0)
    assert sum(s.params.experts for s in shards) == full.params.experts
    assert all(s.params.dense == full.params.dense for s in shards)  # dense replicated over dp


def test_tp_splits_heads_and_vocab():
    cfg = _cfg("parallel.tp=2")
    full = build_rank_shard(_cfg(), world_size=1, rank=0)
    shard = build_rank_shard(cfg, world_size=2, rank=1)
    assert shard.params.embedding * 2 == full.params.embedding
    assert shard.params.head * 2 == full.params.head
    assert shard.params.dense < full.params.dense


def test_pipeline_stages_split_the_layers():
    cfg = _cfg("parallel.pp=2", "data.global_batch_size=16")
    first, last = (build_rank_shard(cfg, world_size=2, rank=r) for r in (0, 1))
    assert first.local_layers == (0,) and last.local_layers == (1,)
    assert first.first_stage and not first.last_stage and last.last_stage
    assert first.params.head == 0 and last.params.head > 0


def test_fsdp_shards_every_parameter_over_dp():
    cfg = _cfg("parallel.dp_mode=fsdp")
    full = build_rank_shard(_cfg(), world_size=1, rank=0)
    shards = [build_rank_shard(cfg, world_size=2, rank=r) for r in range(2)]
    assert sum(s.params.total for s in shards) == full.params.total
    assert all(s.sharded_over_dp for s in shards)


def test_param_kinds():
    assert param_kind("model.layers.3.mlp.experts.gate_up_proj") == "experts"
    assert param_kind("model.embed_tokens.weight") == "embedding"
    assert param_kind("lm_head.weight") == "head"
    assert param_kind("model.layers.0.self_attn.0.q_a_proj.weight") == "dense"


def test_longcat_flash_sizes_match_the_paper():
    """§1/§2: 560B total; 18.6B-31.3B activated, ~27B on average (K_e = 8)."""
    cfg, _ = compose_run_config("pretrain", ["model=longcat_flash", "moe.expected_ffn_experts=8"])
    totals = model_totals(cfg)
    assert totals.total == pytest.approx(560e9, rel=0.01)
    assert totals.active_expected == pytest.approx(27e9, rel=0.02)
    assert totals.active_min == pytest.approx(18.6e9, rel=0.01)
    assert totals.active_max == pytest.approx(31.3e9, rel=0.01)


def test_longcat_flash_rank_of_a_large_job_is_built_on_meta():
    """The paper-like layout's first rank: its real shards, counted; experts are 1/ep of 2 layers'."""
    cfg, _ = compose_run_config("pretrain", [
        "model=longcat_flash", "moe.expected_ffn_experts=8", "parallel.ep=32", "parallel.pp=14",
        "parallel.pp_schedule=zbv", "data.seq_length=8192", "data.micro_batch_size=1",
        "data.global_batch_size=3584"])
    report = dry_run(cfg, world_size=1792, rank=0)
    shard = report.shard
    m = cfg.model
    assert shard.local_layers == (0, 27)  # ZB-V: rank 0 holds the first and the last stage
    assert shard.params.experts == 2 * (m.n_routed_experts // 32) * 3 * m.hidden_size * m.expert_ffn_hidden_size
    assert shard.params.embedding == m.vocab_size * m.hidden_size  # one table, shared by both ends
    assert shard.params.head == m.vocab_size * m.hidden_size
