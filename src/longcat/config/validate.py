"""The one validation of a run's configuration: every check a run makes before it builds anything.

``validate(cfg, world_size=N)`` runs each section's own ``validate`` (the smallest config owning the
fields), the layout on N ranks (``config.layout``: the rules ``distributed.ParallelDims`` applies at run
time) and the checks across sections. The CLI calls it at compose time (``--cfg``, ``--validate``) and
``launch.run_training`` calls it before the process groups, so a value a run would reject fails with the
same message before any work.

Guards that need more than the configuration (files, the tokenizer, the machine) stay where the work
happens.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

from longcat.config.layout import check_model_split, divisors
from longcat.config.schema import (
    ConfigError,
    FaultTarget,
    LMHeadCE,
    MoEChunkDim,
    PipelineSchedule,
    RunConfig,
    num_grad_accum_steps,
)

__all__ = ["ConfigError", "validate", "world_size_from_env"]

# The modules ``train.compile`` compiles (``longcat.model.compile.dense_blocks``) and everything inside them.
_COMPILED_MODULE = re.compile(
    r"^model\.(layers\.\d+\.(self_attn|mlps|input_layernorm|post_attention_layernorm)\.\d+|mtp)(\.|$)")


def world_size_from_env() -> int:
    """The world size torchrun gives this process (``WORLD_SIZE``), 1 without torchrun."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} in the environment is not an integer") from None


def validate(cfg: RunConfig, *, world_size: int) -> None:
    """Check ``cfg`` for a run on ``world_size`` ranks.

    Every section is checked and every problem reported (a section reports each of its independent
    problems); a check across sections runs once the sections it reads are valid, so one wrong value
    is reported once, not again as the consequences it has elsewhere.

    Raises:
        ConfigError: a ``ValueError`` listing every problem found.
    """
    errors: list[str] = []

    def ok(check: Callable[..., None], *args, **kwargs) -> bool:
        try:
            check(*args, **kwargs)
        except ValueError as exc:
            errors.extend(getattr(exc, "errors", None) or [str(exc)])
            return False
        return True

    model_ok = ok(cfg.model.validate)
    if model_ok:
        ok(cfg.moe.validate, cfg.model)
    ok(cfg.optim.validate, cfg.train.steps)
    train_ok = ok(cfg.train.validate)
    ok(cfg.logging.validate)
    ok(cfg.sdc.validate, parallel=cfg.parallel, determinism_enabled=cfg.determinism.enabled,
       checkpoint_interval=cfg.train.checkpoint_interval)
    parallel_ok = ok(cfg.parallel.validate, world_size=world_size)
    dp = cfg.parallel.resolved_dp(world_size) if parallel_ok else None
    ok(cfg.data.validate, dp=dp, vocab_size=cfg.model.vocab_size if model_ok else None)  # None: not checked
    if model_ok:
        ok(_check_positions, cfg)
    ok(_check_fault_target_runs, cfg)
    if dp is not None:
        ok(_check_sequence_split, cfg)
        if model_ok:
            ok(_check_model_fits_layout, cfg, dp=dp)
        accum = _micro_batches_per_rank(cfg, dp=dp)
        if accum is not None:  # None: the batch does not split (data.validate reports that)
            if train_ok:
                ok(_check_micro_batches, cfg, dp=dp, accum=accum)
            ok(_check_replay_microbatch, cfg, dp=dp, accum=accum)
    if errors:
        raise ConfigError(errors)


def _check_model_fits_layout(cfg: RunConfig, *, dp: int) -> None:
    """The model's dimensions split evenly over tp, ep and the pipeline stages.

    Raises:
        ValueError: heads % tp, experts % ep, layers % stages (``config.layout``); vocabulary or dense
            FFN width % tp (tensor parallelism splits them); ``parallel.moe_chunks`` not dividing the
            experts of one ep rank (``moe_chunk_dim=expert``) or the tokens one rank dispatches per
            micro-batch, micro_batch_size x seq_length / (cp x tp) (``moe_chunk_dim=token``).
    """
    m, p = cfg.model, cfg.parallel
    check_model_split(tp=p.tp, pp=p.pp, ep=p.ep, stage_size=dp * p.cp * p.tp, num_attention_heads=m.num_attention_heads,
                      n_routed_experts=m.n_routed_experts, num_layers=m.num_layers, num_stages=p.num_stages)
    if p.tp > 1:
        for name in ("vocab_size", "ffn_hidden_size"):
            value = getattr(m, name)
            if value % p.tp:
                valid = [d for d in range(1, min(value, 64) + 1) if value % d == 0]
                raise ValueError(f"model.{name}={value} is not divisible by parallel.tp={p.tp}: tensor parallelism "
                                 f"splits it evenly over the tp ranks; choose tp in {valid} (or change {name})")
    local_experts = m.n_routed_experts // p.ep
    if not (p.ep > 1 or p.tp > 1) or p.moe_chunks == 1:  # no exchanging token dispatcher, or no chunks
        return
    if MoEChunkDim(p.moe_chunk_dim) is MoEChunkDim.expert and local_experts % p.moe_chunks:
        raise ValueError(f"parallel.moe_chunks={p.moe_chunks} must divide the {local_experts} local experts "
                         f"(model.n_routed_experts={m.n_routed_experts} / parallel.ep={p.ep}) with "
                         f"parallel.moe_chunk_dim=expert: chunks are groups of local experts; choose one of "
                         f"{divisors(local_experts)}, or parallel.moe_chunk_dim=token")
    # a cp rank holds S/cp tokens of each sequence, and each tp rank dispatches 1/tp of its tokens
    tokens = cfg.data.micro_batch_size * cfg.data.seq_length // (p.cp * p.tp)
    if MoEChunkDim(p.moe_chunk_dim) is MoEChunkDim.token and (tokens % p.moe_chunks or tokens < p.moe_chunks):
        raise ValueError(f"parallel.moe_chunks={p.moe_chunks} must divide the {tokens} tokens a rank dispatches "
                         f"per micro-batch (data.micro_batch_size={cfg.data.micro_batch_size} x data.seq_length="
                         f"{cfg.data.seq_length} / (parallel.cp={p.cp} x parallel.tp={p.tp})) with "
                         f"parallel.moe_chunk_dim=token: chunks are equal parts of them; choose one of "
                         f"{divisors(tokens)[:8]}")


def _check_positions(cfg: RunConfig) -> None:
    """The sequence fits the model's positions."""
    seq = cfg.data.seq_length
    if seq > cfg.model.max_position_embeddings:
        raise ValueError(f"data.seq_length={seq} exceeds model.max_position_embeddings="
                         f"{cfg.model.max_position_embeddings}; raise the latter or shorten the sequence")


def _check_sequence_split(cfg: RunConfig) -> None:
    """Under context / sequence parallelism the sequence splits evenly over cp (2 cp chunks) / tp."""
    seq, p = cfg.data.seq_length, cfg.parallel
    if p.cp > 1 and seq % (2 * p.cp):
        lower = seq - seq % (2 * p.cp)
        choices = f"{lower} or {lower + 2 * p.cp}" if lower else f"{2 * p.cp}"
        raise ValueError(f"data.seq_length={seq} is not divisible by 2*parallel.cp={2 * p.cp}: context parallelism "
                         f"cuts each sequence into 2*cp equal chunks (load-balanced causal attention); use "
                         f"data.seq_length={choices}, or a cp that divides seq_length/2")
    if p.sequence_parallel and p.tp > 1 and seq % p.tp:
        raise ValueError(f"data.seq_length={seq} is not divisible by parallel.tp={p.tp}: sequence parallelism "
                         f"splits the sequence over the tp ranks; choose a multiple of {p.tp} or set "
                         "parallel.sequence_parallel=false")


def _micro_batches_per_rank(cfg: RunConfig, *, dp: int) -> Optional[int]:
    """global_batch / (micro_batch x dp), or None where the global batch does not split that way."""
    micro, batch = cfg.data.micro_batch_size, cfg.data.global_batch_size
    if micro <= 0 or batch <= 0 or batch % (micro * dp):
        return None
    return num_grad_accum_steps(cfg, dp=dp)


def _check_micro_batches(cfg: RunConfig, *, dp: int, accum: int) -> None:
    """Gradient accumulation, and the micro-batches a pipeline schedule needs (``accum`` micro-batches
    per dp rank and step, ``_micro_batches_per_rank``).

    Raises:
        ValueError: ``train.grad_accum`` or ``parallel.pp_microbatches`` disagreeing with
            global_batch / (micro_batch x dp); 1F1B with fewer micro-batches than stages; an interleaved
            1F1B count that is not a multiple of its rounds (torch ``ScheduleInterleaved1F1B``).
    """
    derived = f"global_batch_size / (micro_batch_size x dp) = {cfg.data.global_batch_size} / " \
              f"({cfg.data.micro_batch_size} x {dp}) = {accum}"
    if cfg.train.grad_accum not in (0, accum):
        raise ValueError(f"train.grad_accum={cfg.train.grad_accum} disagrees with {derived}; leave it 0 to derive it")
    p = cfg.parallel
    if p.pp_microbatches not in (0, accum):
        raise ValueError(f"parallel.pp_microbatches={p.pp_microbatches} but each dp rank runs {derived} "
                         "micro-batches per step; leave it 0")
    if p.pp <= 1:
        return
    schedule = PipelineSchedule(p.pp_schedule)
    if schedule is PipelineSchedule.one_f_one_b and accum < p.num_stages:
        raise ValueError(f"parallel.pp_schedule=1f1b needs at least pp={p.num_stages} micro-batches per step, but "
                         f"{derived}: raise data.global_batch_size or lower parallel.pp")
    rounds = max(1, accum // p.pp)
    if schedule is PipelineSchedule.interleaved_1f1b and accum % rounds:
        raise ValueError(f"parallel.pp_schedule=interleaved_1f1b runs micro-batches in rounds of pp={p.pp}: "
                         f"{derived} is not a multiple of its {rounds} rounds; use a multiple of {p.pp} "
                         "micro-batches per step")


def _check_fault_target_runs(cfg: RunConfig) -> None:
    """An activation fault needs a module whose forward runs eagerly: with the fused head + CE
    (``loss.lm_head_ce=fused``) the LM head's weight is used inside the model's forward but the
    ``lm_head`` module is never called, so a hook on it would never fire; under ``train.compile`` the
    dense blocks (``longcat.model.compile``) and the modules inside them run as compiled graphs.

    Raises:
        ValueError: ``sdc.inject.target=activation`` on ``lm_head`` under the fused head, or on a dense
            block (or a module inside one) under ``train.compile``.
    """
    inject = cfg.sdc.inject
    if (inject.step >= 0 and FaultTarget(inject.target) is FaultTarget.activation and inject.tensor == "lm_head"
            and LMHeadCE(cfg.loss.lm_head_ce) is LMHeadCE.fused):
        raise ValueError("sdc.inject.tensor=lm_head with sdc.inject.target=activation: under "
                         "loss.lm_head_ce=fused the LM head produces no activation (its loss is fused with its "
                         "GEMM); inject into model.norm, or set loss.lm_head_ce=logits")
    if (inject.step >= 0 and FaultTarget(inject.target) is FaultTarget.activation and cfg.train.compile
            and _COMPILED_MODULE.match(inject.tensor)):
        raise ValueError(f"sdc.inject.tensor={inject.tensor} with sdc.inject.target=activation: under "
                         "train.compile=true that module runs inside a compiled dense block, where the fault's "
                         "forward hook is not honoured; inject into an eager module (model.norm, "
                         "model.embed_tokens, model.layers.N.mlp.experts), or set train.compile=false")


def _check_replay_microbatch(cfg: RunConfig, *, dp: int, accum: int) -> None:
    """``sdc.replay_microbatch`` names one of the ``accum`` micro-batches each dp rank runs per step.

    Raises:
        ValueError: with replay on, an index >= global_batch / (micro_batch x dp).
    """
    micro, batch = cfg.data.micro_batch_size, cfg.data.global_batch_size
    if cfg.sdc.replay_interval and cfg.sdc.replay_microbatch >= accum:
        raise ValueError(f"sdc.replay_microbatch={cfg.sdc.replay_microbatch} but each dp rank runs {accum} "
                         f"micro-batches per step (global_batch_size / (micro_batch_size x dp) = {batch} / "
                         f"({micro} x {dp})); choose one in [0, {accum - 1}]")
