"""longcat.config.validate: every check a run makes on its configuration, before any work, in one place."""

from __future__ import annotations

import re

import pytest

from longcat.config.compose import compose_run_config
from longcat.config.validate import ConfigError, validate


def _cfg(*overrides: str):
    cfg, _ = compose_run_config("pretrain", list(overrides))
    return cfg


@pytest.mark.parametrize("world_size,overrides,needle", [
    # layout degrees (the arithmetic distributed.ParallelDims applies at run time)
    (1, ["parallel.tp=3"], r"world_size=1 is not divisible by pp\*tp=3"),
    (4, ["parallel.dp=3"], r"world_size=4 != pp\*dp\*tp = 1\*3\*1 = 3: set parallel.dp=4"),
    (4, ["parallel.ep=3"], r"parallel.ep=3 must divide dp\*tp=4 .*choose ep in \[1, 2, 4\]"),
    (1, ["parallel.pp=0"], r"parallel.pp=0 must be an integer >= 1"),
    # context parallelism
    (2, ["parallel.cp=4"], r"parallel.cp=4 is larger than the world size 2: choose cp in \[1, 2\]"),
    (4, ["parallel.cp=3"], r"world_size=4 is not divisible by pp\*cp\*tp=3"),
    (2, ["parallel=cp2", "data.seq_length=126"], r"data.seq_length=126 is not divisible by 2\*parallel.cp=4: .*"
                                                  r"data.seq_length=124 or 128"),
    (2, ["parallel=cp2", "parallel.dp_mode=deepspeed"], r"parallel.cp=2 with parallel.dp_mode=deepspeed"),
    (4, ["parallel=cp2", "parallel.tp=2", "parallel.sequence_parallel=true"],
     r"parallel.cp=2 with parallel.sequence_parallel=true is not supported"),
    (3, ["parallel.tp=3"], r"model.num_attention_heads=4 is not divisible by parallel.tp=3: choose tp in \[1, 2, 4\]"),
    (3, ["parallel.ep=3"], r"model.n_routed_experts=8 is not divisible by parallel.ep=3"),
    (2, ["parallel=pp2", "parallel.pp_schedule=zbv"],
     r"^model.num_layers=2 is not divisible by the 4 pipeline stages \(parallel.pp=2 x 2 per rank\): set "
     r"model.num_layers to a multiple of 4 \(2 stages per rank x pp=2\), or parallel.pp_schedule=1f1b "
     r"\(one stage per rank\)$"),
    (2, ["parallel=pp2", "parallel.pp_schedule=interleaved_1f1b", "model.num_layers=6"],
     r"multiple of 4 \(2 stages per rank x pp=2\), or parallel.pp_schedule=1f1b \(one stage per rank\), or "
     r"parallel.pp in \[3\]$"),
    (3, ["parallel.pp=3", "model.num_layers=4", "data.global_batch_size=48"],
     r"^model.num_layers=4 is not divisible by the 3 pipeline stages \(parallel.pp=3\): set model.num_layers "
     r"to a multiple of 3, or parallel.pp in \[2, 4\]$"),
    # combinations parallelize refuses (model.parallel.parallelize.check_layout)
    (2, ["parallel.ep=2", "parallel.dp_mode=deepspeed"], r"dp_mode=deepspeed supports data parallelism only"),
    (2, ["parallel=deepspeed2", "parallel.zero_stage=3"], r"parallel.zero_stage=3: use 1 or 2"),
    # the library checks a run meets only once the model is built or the first step runs
    (2, ["parallel.tp=2", "model.vocab_size=8191"], r"model.vocab_size=8191 is not divisible by parallel.tp=2"),
    (2, ["parallel=tp2", "data.seq_length=127"], r"data.seq_length=127 is not divisible by parallel.tp=2"),
    (2, ["parallel=ep2", "parallel.moe_chunks=3"], r"parallel.moe_chunks=3 must divide the 4 local experts"),
    (1, ["parallel.moe_chunks=0"], r"parallel.moe_chunks=0 must be >= 1"),
    (2, ["parallel=ep2", "parallel.moe_chunks=3"], r"or parallel.moe_chunk_dim=token"),
    (2, ["parallel=ep2", "parallel.moe_chunks=3", "parallel.moe_chunk_dim=token", "data.micro_batch_size=1",
         "data.seq_length=128"], r"parallel.moe_chunks=3 must divide the 128 tokens a rank dispatches per micro-batch"),
    (4, ["parallel=tp2_ep2", "parallel.moe_chunks=3", "parallel.moe_chunk_dim=token", "data.micro_batch_size=1",
         "data.seq_length=128"], r"must divide the 64 tokens .*parallel.cp=1 x parallel.tp=2"),
    (2, ["parallel=cp2_ep2", "parallel.moe_chunks=3", "parallel.moe_chunk_dim=token", "data.micro_batch_size=1",
         "data.seq_length=128"], r"must divide the 64 tokens .*parallel.cp=2 x parallel.tp=1"),
    (2, ["parallel=ep2", "parallel.moe_chunks=2", "parallel.moe_dispatcher=allgather"],
     r"parallel.moe_chunks=2 with parallel.moe_dispatcher=allgather: .* set parallel.moe_chunks=1"),
    (4, ["parallel=pp2_ep2"], r"pp_schedule=1f1b needs at least pp=2 micro-batches per step"),
    (2, ["parallel=pp2", "model.num_layers=4", "parallel.pp_schedule=interleaved_1f1b",
         "data.global_batch_size=40"], r"interleaved_1f1b .* 5 is not a multiple of its 2 rounds"),
    # from the trainer, stability monitor and SDC monitor
    (1, ["parallel.pp_microbatches=3"], r"parallel.pp_microbatches=3 but each dp rank runs .* = 2"),
    (1, ["train.grad_accum=3"], r"train.grad_accum=3 disagrees with .* = 2"),
    # ranges and sequence
    (1, ["optim.lr=-1"], r"optim.lr=-1.0 must be positive"),
    (1, ["optim.weight_decay=-0.1"], r"optim.weight_decay=-0.1 must be >= 0"),
    (1, ["data.seq_length=100000"], r"data.seq_length=100000 exceeds model.max_position_embeddings=4096"),
    (1, ["logging.log_interval=0"], r"logging.log_interval=0 must be >= 1"),
    (1, ["moe.lb_num_groups=3"], r"moe.lb_num_groups=3 must divide model.n_routed_experts=8"),
    (1, ["model.vocab_size=200"], r"model.vocab_size=200 is too small for the stdlib corpus"),
    (1, ["data.corpus=files", "data.sources=[{path: x, weight: 1.0}]"], r"data.corpus=files needs data.tokenizer"),
    # non-finite and out-of-range numbers, each message naming only the wrong key and its value
    (1, ["optim.lr=nan"], r"optim.lr=nan must be a finite number"),
    (1, ["optim.lr=inf"], r"optim.lr=inf must be a finite number"),
    (1, ["optim.eps=nan"], r"optim.eps=nan must be a finite number"),
    (1, ["optim.weight_decay=inf"], r"optim.weight_decay=inf must be a finite number"),
    (1, ["optim.min_lr_ratio=5"], r"optim.min_lr_ratio=5.0 must lie in \[0, 1\]"),
    (1, ["optim.clip_grad=-1"], r"optim.clip_grad=-1.0 must be >= 0 \(the max gradient norm; 0 disables clipping\)"),
    (1, ["moe.lb_loss_coef=-1"], r"moe.lb_loss_coef=-1.0 must be >= 0"),
    (1, ["moe.lb_loss_coef=nan"], r"moe.lb_loss_coef=nan must be a finite number"),
    (1, ["moe.bias_update_rate=inf"], r"moe.bias_update_rate=inf must be a finite number"),
    (1, ["moe.rg_threshold=-1"], r"^moe.rg_threshold=-1.0 must be positive$"),
    (1, ["moe.router_health_interval=-1"], r"^moe.router_health_interval=-1 must be >= 0 \(0 = off\)$"),
    (1, ["moe.auto_lb_coef=true", "moe.router_health_interval=0"],
     r"moe.auto_lb_coef=true .* moe.router_health_interval=0 takes none; set moe.router_health_interval"),
    (1, ["sdc.replay_interval=1", "determinism.enabled=true", "sdc.replay_microbatch=2"],
     r"sdc.replay_microbatch=2 but each dp rank runs 2 micro-batches per step .* choose one in \[0, 1\]"),
    (2, ["parallel=dp2", "sdc.replay_interval=1", "determinism.enabled=true", "sdc.replay_microbatch=1"],
     r"sdc.replay_microbatch=1 but each dp rank runs 1 micro-batches per step"),
])
def test_each_check_names_the_value_and_the_fix(world_size, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(_cfg(*overrides), world_size=world_size)


@pytest.mark.parametrize("world_size,overrides", [
    (1, []), (2, ["parallel=ep2"]), (2, ["parallel=dp2"]), (2, ["parallel=fsdp2"]), (2, ["parallel=pp2"]),
    (2, ["parallel=tp2"]), (2, ["parallel=deepspeed2"]), (4, ["parallel=tp2_ep2"]),
    (4, ["parallel=pp2_ep2", "data.global_batch_size=32"]), (2, ["parallel=cp2"]), (2, ["parallel=cp2_ep2"]),
    (4, ["parallel=cp2", "parallel.tp=2"]), (4, ["parallel=cp2_ep2", "parallel.pp=2", "data.global_batch_size=32"]),
    (2, ["parallel=cp2", "parallel.dp_mode=fsdp"]), (4, ["parallel=cp2", "parallel.dp=2", "parallel.dp_mode=fsdp"]),
    (4, ["parallel=pp2_tp2"]), (4, ["parallel=pp2_fsdp2", "data.global_batch_size=32"]),
    (4, ["parallel=pp2_fsdp2", "data.global_batch_size=32", "moe.auto_lb_coef=true"]),  # R_g through FSDP2's hooks
    (8, ["parallel=pp2_tp2", "parallel.dp=2", "parallel.dp_mode=fsdp", "parallel.ep=2", "data.global_batch_size=32"]),
    (2, ["parallel=ep2", "parallel.moe_dispatcher=allgather"]),
    (2, ["parallel=ep2", "parallel.moe_chunks=8", "parallel.moe_chunk_dim=token"]),  # 8 > the 4 local experts
])
def test_the_parallel_presets_validate_at_their_world_size(world_size, overrides):
    validate(_cfg(*overrides), world_size=world_size)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate(_cfg("optim.lr=-1", "train.keep_last=0", "data.seq_length=100000"), world_size=1)
    assert len(info.value.errors) == 3, info.value.errors
    assert str(info.value) == "\n".join(info.value.errors)


@pytest.mark.parametrize("overrides,num_errors", [
    (["optim.lr=-1", "optim.eps=-1", "optim.weight_decay=-1"], 3),
    (["train.steps=0", "train.keep_last=0", "train.grad_accum=-1"], 3),
    (["moe.lb_loss_coef=-1", "moe.rg_threshold=-1", "moe.router_health_interval=-1"], 3),
    (["parallel.moe_chunks=0", "parallel.pp_microbatches=-1"], 2),
])
def test_a_section_reports_each_of_its_problems(overrides, num_errors):
    with pytest.raises(ConfigError) as info:
        validate(_cfg(*overrides), world_size=1)
    assert len(info.value.errors) == num_errors, info.value.errors
    for override in overrides:
        key, value = override.split("=")
        assert sum(e.startswith(f"{key}={value}") for e in info.value.errors) == 1, (override, info.value.errors)



@pytest.mark.parametrize("world_size,overrides,needles", [
    # a batch that does not split hid the cp split of the sequence (and every other data problem)
    (2, ["parallel=cp2", "data.seq_length=126", "data.global_batch_size=3", "data.valid_fraction=2"],
     [r"data.global_batch_size=3 must be a positive multiple of .* = 8: set data.global_batch_size to a multiple "
      r"of 8 \(e.g. 8\), or data.micro_batch_size to one of \[1, 3\]",
      r"data.seq_length=126 is not divisible by 2\*parallel.cp=4: .* use data.seq_length=124 or 128",
      r"data.valid_fraction=2.0 must lie in \(0, 1\)"]),
    # an invalid layout (dp unknown) hides only the checks that need dp
    (1, ["parallel.tp=3", "data.valid_fraction=2", "data.seq_length=100000"],
     [r"world_size=1 is not divisible by pp\*tp=3", r"data.valid_fraction=2.0 must lie in \(0, 1\)",
      r"data.seq_length=100000 exceeds model.max_position_embeddings=4096; raise"]),
    # the micro-batch checks need only a batch that splits, not a valid data section
    (1, ["train.grad_accum=3", "data.valid_fraction=2"],
     [r"train.grad_accum=3 disagrees with .* = 2; leave it 0", r"data.valid_fraction=2.0 must lie in \(0, 1\)"]),
])
def test_independent_problems_are_reported_together_each_with_its_fix(world_size, overrides, needles):
    with pytest.raises(ConfigError) as info:
        validate(_cfg(*overrides), world_size=world_size)
    errors = info.value.errors
    assert len(errors) == len(needles), errors
    for needle in needles:
        assert sum(bool(re.search(needle, e)) for e in errors) == 1, (needle, errors)
