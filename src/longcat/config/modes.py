"""The modes of a run's configuration: every choice among named values is one of these enums.

A config field typed with one of them makes OmegaConf reject any other value at compose time, listing the
allowed ones. Re-exported by ``longcat.config.schema``; library code compares fields with the members
(``cfg.parallel.dp_mode is DPMode.fsdp``) or, since each is a ``str``, with the plain string.
"""

from __future__ import annotations

import enum

__all__ = ["BiasRateSchedule", "Corpus", "DPMode", "Device", "FaultTarget", "LMHeadCE", "LRSchedule", "MoEChunkDim",
           "MoEDispatcher", "NonFinitePolicy", "Overflow", "Packing", "PipelineSchedule", "ResumeMode", "SDCPolicy",
           "StrEnum", "WandbMode"]


class StrEnum(str, enum.Enum):
    """A config mode: a ``str`` whose ``str()`` and f-string form are its value (``enum.StrEnum`` of
    Python 3.11, kept here for 3.10), so it compares, prints and reaches libraries as the YAML string.

    Member names equal their values: OmegaConf matches a YAML string against enum *names*.
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


class LRSchedule(StrEnum):
    warmup_cosine = "warmup_cosine"
    wsd = "wsd"  # warmup-stable-decay
    constant = "constant"


class LMHeadCE(StrEnum):
    """How the LM head's cross-entropy is taken (``loss.lm_head_ce``)."""

    fused = "fused"  # head GEMM + CE chunk by chunk: the [tokens, vocab] logits never exist
    logits = "logits"  # the head's logits [B, S, V] (model output), then the chunked CE over them


class BiasRateSchedule(StrEnum):
    constant = "constant"
    cosine = "cosine"  # mu decays to mu * bias_update_rate_min_ratio over train.steps
    linear = "linear"


class NonFinitePolicy(StrEnum):
    skip = "skip"  # leave parameters, optimizer state, LR schedule and expert bias untouched
    abort = "abort"


class ResumeMode(StrEnum):
    auto = "auto"  # latest complete checkpoint under train.out_dir, else fresh
    none = "none"  # always start fresh (refuses to overwrite existing checkpoints)


class Device(StrEnum):
    cpu = "cpu"  # gloo
    cuda = "cuda"  # NCCL for CUDA tensors, gloo for the small CPU reductions


class WandbMode(StrEnum):
    online = "online"
    offline = "offline"  # a local run folder; upload later with `wandb sync`
    disabled = "disabled"


class Corpus(StrEnum):
    stdlib = "stdlib"  # the embedded corpus (the interpreter's standard-library sources)
    files = "files"  # data.sources: Megatron .bin/.idx prefixes tokenized by data.tokenizer
    sft = "sft"  # agentic SFT conversations (data.sft_path)


class Packing(StrEnum):
    pad = "pad"  # one conversation per sample, right-padded
    greedy = "greedy"  # next-fit packing, EOD-separated
    PAD, GREEDY = "pad", "greedy"  # aliases (same members): the spelling longcat.data.sft uses


class Overflow(StrEnum):
    drop = "drop"  # conversations longer than data.seq_length + 1 are left out (counted)
    truncate = "truncate"
    DROP, TRUNCATE = "drop", "truncate"  # aliases (same members): the spelling longcat.data.sft uses


class DPMode(StrEnum):
    replicate = "replicate"  # bucketed all-reduce of the gradients
    fsdp = "fsdp"  # FSDP2 fully_shard over dp (experts over edp)
    deepspeed = "deepspeed"  # DeepSpeed ZeRO-1/2; dp only


class MoEDispatcher(StrEnum):
    """How expert parallelism moves the MoE's tokens (``longcat.model.moe.dispatch``)."""

    alltoall = "alltoall"  # one copy per FFN expert chosen, uneven all-to-alls (AllToAllTokenDispatcher)
    allgather = "allgather"  # each routed token once to every ep rank; reduce-scatter back (AllGatherTokenDispatcher)


class MoEChunkDim(StrEnum):
    """What ``parallel.moe_chunks`` > 1 splits the expert-parallel exchange by."""

    expert = "expert"  # groups of local experts (every expert's rows in one GEMM)
    token = "token"  # each rank's tokens in consecutive parts (the paper's split, arXiv 2509.01322 §5.3)


class PipelineSchedule(StrEnum):
    """Pipeline schedule (``torch.distributed.pipelining``); the values are the accepted strings."""

    vars()["1f1b"] = "1f1b"  # torch Schedule1F1B, one stage per rank ("1f1b" is no identifier: see one_f_one_b)
    interleaved_1f1b = "interleaved_1f1b"  # torch ScheduleInterleaved1F1B, 2 virtual stages per rank
    zbv = "zbv"  # torch ScheduleZBVZeroBubble: 2 stages per rank in a V, split input/weight backward
    one_f_one_b = "1f1b"  # alias of the member "1f1b" for attribute access (same member)

    @property
    def stages_per_rank(self) -> int:
        return 1 if self is PipelineSchedule.one_f_one_b else 2

    @property
    def placement(self) -> str:
        return "v" if self is PipelineSchedule.zbv else "loop"


class SDCPolicy(StrEnum):
    warn = "warn"  # report, count, continue
    halt = "halt"  # every rank stops cleanly; no checkpoint is written from the suspect state
    rollback = "rollback"  # reload the last good checkpoint and continue


class FaultTarget(StrEnum):
    activation = "activation"  # output of a module (``tensor``: a module name) in the first forward
    gradient = "gradient"  # a parameter's gradient after the first backward (``tensor``: parameter name)
    parameter = "parameter"  # a parameter after the optimizer step (``tensor``: parameter name)
