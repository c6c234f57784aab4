"""Typed configuration: the schema every recipe is composed against.

The dataclasses here are registered in Hydra's ConfigStore by ``longcat.config.compose`` (Hydra stays in
the config layer and the entry point); library code receives these plain objects, never a DictConfig.
Every mode is an enum, so a wrong value fails at compose time with the allowed ones. Each section's
``validate`` raises ``ValueError`` naming the offending values and the fix (``ConfigError``, one
message per problem, where a section checks several independent things); ``longcat.config.validate``
runs them all, with the checks across sections and the world size, before a run builds anything.

Model field names follow Hugging Face ``LongcatFlashConfig`` so that a ``ModelConfig`` maps 1:1 onto
a ``config.json`` of the released LongCat-Flash layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from longcat.config.layout import divisors, resolve_dp
from longcat.config.modes import (  # noqa: F401  (the modes are part of the schema's interface)
    BiasRateSchedule,
    Corpus,
    Device,
    DPMode,
    FaultTarget,
    LMHeadCE,
    LRSchedule,
    MoEChunkDim,
    MoEDispatcher,
    NonFinitePolicy,
    Overflow,
    Packing,
    PipelineSchedule,
    ResumeMode,
    SDCPolicy,
    StrEnum,
    WandbMode,
)


class ConfigError(ValueError):
    """An invalid configuration; ``errors`` holds one message per problem (each naming the value and the
    fix), ``str()`` joins them with newlines."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = list(errors)


def _number_problems(key: str, value: float, *, positive: bool, note: str = "") -> list[str]:
    """``[]`` for a finite ``value`` > 0 (``positive``) or >= 0, else the one problem, naming the value."""
    if not math.isfinite(value):
        return [f"{key}={value} must be a finite number{note}"]
    if value < 0 or (positive and value == 0):
        return [f"{key}={value} must be {'positive' if positive else '>= 0'}{note}"]
    return []


@dataclass
class ModelConfig:
    """LongCat-Flash dimensions (arXiv 2509.01322 §2; names as in HF ``LongcatFlashConfig``)."""

    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 8
    zero_expert_num: int = 4
    moe_topk: int = 4
    expert_ffn_hidden_size: int = 64
    routed_scaling_factor: float = 2.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    attention_bias: bool = False
    mtp_num_layers: int = 0  # 0 or 1: the MTP head of §2.4
    tie_word_embeddings: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts_total(self) -> int:
        """FFN experts plus zero-computation experts: the router's output width."""
        return self.n_routed_experts + self.zero_expert_num

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "moe_topk", "expert_ffn_hidden_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                hint = (" (LongCat-Flash's MLA always compresses the queries: a positive int, 1536 in the release; "
                        "a config.json with q_lora_rank null describes a model without that projection)"
                        if name == "q_lora_rank" else "")
                raise ValueError(f"model.{name}={value!r} must be a positive integer{hint}")
        if isinstance(self.zero_expert_num, bool) or not isinstance(self.zero_expert_num, int) \
                or self.zero_expert_num < 0:
            raise ValueError(f"model.zero_expert_num={self.zero_expert_num!r} must be an integer >= 0")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE pairs)")
        if self.moe_topk > self.num_experts_total:
            raise ValueError(
                f"model.moe_topk={self.moe_topk} exceeds the {self.num_experts_total} experts "
                f"(n_routed_experts={self.n_routed_experts} + zero_expert_num={self.zero_expert_num}); "
                "lower moe_topk or add experts"
            )
        if self.mtp_num_layers not in (0, 1):
            raise ValueError(f"model.mtp_num_layers={self.mtp_num_layers}: only 0 or 1 MTP layer is supported")


@dataclass
class MoEConfig:
    """Router training controls: bias controller (Eq. 2), load balance (Eq. 3-5)."""

    expected_ffn_experts: float = 3.0  # K_e: target average FFN experts per token per layer
    bias_update_rate: float = 1e-3  # mu of Eq. 2
    bias_update_schedule: BiasRateSchedule = BiasRateSchedule.constant
    bias_update_rate_min_ratio: float = 0.1
    lb_loss_coef: float = 1e-2  # alpha of Eq. 3
    lb_num_groups: int = 0  # D of Eq. 4: FFN-expert groups (0 = the EP degree, the paper's devices)
    capture_router_stats: bool = True
    # Stability suite (§3.1.3; longcat.train.stability). R_g of Eq. 9 measured on the first
    # micro-batch every router_health_interval steps (0 = off; costs ~1 extra backward of it).
    router_health_interval: int = 10
    auto_lb_coef: bool = False  # lower alpha so that every layer's R_g stays <= rg_threshold
    rg_threshold: float = 0.1
    router_collapse_threshold: float = 0.5  # warn when router rows' mean pairwise cosine exceeds it

    def validate(self, model: ModelConfig) -> None:
        """Checks of the moe section for ``model``.

        Raises:
            ConfigError: every problem found, each naming the value and the fix.
        """
        problems = []
        if not 0 < self.expected_ffn_experts <= model.moe_topk:  # False for nan
            problems.append(
                f"moe.expected_ffn_experts={self.expected_ffn_experts} must lie in (0, moe_topk={model.moe_topk}]")
        elif model.zero_expert_num == 0 and self.expected_ffn_experts != model.moe_topk:
            problems.append(
                f"moe.expected_ffn_experts={self.expected_ffn_experts} but model.zero_expert_num=0: every token "
                f"then uses exactly moe_topk={model.moe_topk} FFN experts; set moe.expected_ffn_experts="
                f"{model.moe_topk} or add zero experts")
        for name in ("bias_update_rate", "lb_loss_coef"):
            problems += _number_problems(f"moe.{name}", getattr(self, name), positive=False, note=" (0 disables it)")
        if self.lb_num_groups < 0:
            problems.append(f"moe.lb_num_groups={self.lb_num_groups} must be >= 0 (0 = the EP degree)")
        elif self.lb_num_groups and self.lb_loss_coef > 0 and model.n_routed_experts % self.lb_num_groups:
            problems.append(f"moe.lb_num_groups={self.lb_num_groups} must divide model.n_routed_experts="
                            f"{model.n_routed_experts} (the load-balance loss groups the FFN experts evenly)")
        if self.router_health_interval < 0:
            problems.append(f"moe.router_health_interval={self.router_health_interval} must be >= 0 (0 = off)")
        problems += _number_problems("moe.rg_threshold", self.rg_threshold, positive=True)
        if self.auto_lb_coef and self.router_health_interval == 0:
            problems.append("moe.auto_lb_coef=true adapts alpha from the R_g measurements, but "
                            "moe.router_health_interval=0 takes none; set moe.router_health_interval to N > 0 "
                            "(e.g. 10) or moe.auto_lb_coef=false")
        if problems:
            raise ConfigError(problems)


@dataclass
class LossConfig:
    mtp_weight: float = 0.3  # not given by the paper
    z_loss_coef: float = 1e-6  # lambda of Eq. 10 ("very small"; not given)
    # fused: the LM head's GEMM and the CE chunk by chunk, no [tokens, vocab] logits (training and
    # evaluation); logits: the head's logits, then the CE (the HF-style path, for comparison)
    lm_head_ce: LMHeadCE = LMHeadCE.fused


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-16  # §3.1.3: far below the gradient RMS
    weight_decay: float = 0.1
    clip_grad: float = 1.0  # 0 disables clipping
    schedule: LRSchedule = LRSchedule.warmup_cosine
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: fraction of steps spent decaying
    # Hyperparameter transfer (§3.1.1): width factor s = hidden_size / proxy_hidden_size. 0 = off.
    proxy_hidden_size: int = 0

    def validate(self, steps: int) -> None:
        """Checks of the optim section (``steps``: train.steps).

        Raises:
            ConfigError: every problem found, each naming the value and the fix.
        """
        problems = []
        problems += _number_problems("optim.lr", self.lr, positive=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):  # False for nan
            problems.append(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        problems += _number_problems("optim.eps", self.eps, positive=True)
        problems += _number_problems("optim.weight_decay", self.weight_decay, positive=False)
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1] (the final lr as a "
                            "fraction of optim.lr)")
        problems += _number_problems("optim.clip_grad", self.clip_grad, positive=False,
                                     note=" (the max gradient norm; 0 disables clipping)")
        if self.warmup_steps < 0:  # longer than train.steps: shortened to fit, with a warning (train.schedule)
            problems.append(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            problems.append(f"optim.decay_fraction={self.decay_fraction} must lie in [0, 1]")
        if problems:
            raise ConfigError(problems)


@dataclass
class DataSource:
    """One weighted component of a blended dataset: a Megatron ``.bin/.idx`` prefix."""

    path: str = "???"
    weight: float = 1.0


def _source_path(source) -> str:
    return source["path"] if isinstance(source, dict) else getattr(source, "path", "")


# Smallest vocabulary the stdlib corpus's byte-level BPE can have: 256 bytes + 7 special tokens.
MIN_STDLIB_VOCAB_SIZE = 263


@dataclass
class DataConfig:
    # "stdlib": the embedded default corpus (the interpreter's standard-library sources), prepared and
    # cached by tools/prepare_corpus.py. Otherwise ``sources`` names .bin/.idx prefixes.
    corpus: Corpus = Corpus.stdlib
    sources: list = field(default_factory=list)
    tokenizer: str = ""  # tokenizer.json; defaults to the corpus's own
    cache_dir: str = ".cache/longcat"
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 16
    valid_fraction: float = 0.02
    seed: int = 1234
    corpus_max_bytes: int = 0  # 0 = all of it; a cap for quick runs and tests
    # corpus="sft": agentic SFT conversations (JSONL, `messages` or ShareGPT `conversations`), or
    # "builtin" for the embedded synthetic tool-use set; loss on assistant tokens only.
    sft_path: str = "builtin"
    sft_packing: Packing = Packing.pad
    sft_overflow: Overflow = Overflow.drop
    sft_skip_bad_lines: bool = False

    def validate(self, *, dp: Optional[int], vocab_size: Optional[int]) -> None:
        """Checks of the data section for ``dp`` data-parallel ranks and a model of ``vocab_size`` ids;
        ``None`` for either (an invalid layout or model) skips the checks that need it.

        Raises:
            ConfigError: every problem found, each naming the value and the fix.
        """
        problems = []
        if self.seq_length < 2:
            problems.append(f"data.seq_length={self.seq_length} must be >= 2")
        if dp is not None:
            problems += self._batch_problems(dp=dp)
        if not 0 < self.valid_fraction < 1:
            problems.append(f"data.valid_fraction={self.valid_fraction} must lie in (0, 1), e.g. 0.02")
        if self.corpus == Corpus.files and any(str(_source_path(s)).startswith("stdlib:") for s in self.sources):
            problems.append("data.sources names a stdlib:<part> source; those need data.corpus=stdlib")
        if self.corpus == Corpus.files and not self.sources:
            problems.append("data.corpus=files needs data.sources=[{path: PREFIX, weight: W}, ...]")
        if self.corpus == Corpus.files and not self.tokenizer:
            problems.append(
                "data.corpus=files needs data.tokenizer=PATH/tokenizer.json, the tokenizer that made "
                "data.sources (its <|endoftext|> id separates documents)"
            )
        if (vocab_size is not None and self.corpus != Corpus.files and not self.tokenizer
                and vocab_size < MIN_STDLIB_VOCAB_SIZE):
            problems.append(
                f"model.vocab_size={vocab_size} is too small for the stdlib corpus's byte-level BPE "
                f"(>= {MIN_STDLIB_VOCAB_SIZE}: 256 bytes + 7 special tokens); raise model.vocab_size"
            )
        if problems:
            raise ConfigError(problems)

    def _batch_problems(self, *, dp: int) -> list[str]:
        """The global batch splits into micro-batches over ``dp`` ranks (each problem with its fix)."""
        if self.micro_batch_size <= 0:
            return [f"data.micro_batch_size={self.micro_batch_size} must be >= 1"]
        per_step = self.micro_batch_size * dp
        if self.global_batch_size > 0 and self.global_batch_size % per_step == 0:
            return []
        fix = f"set data.global_batch_size to a multiple of {per_step} (e.g. " \
              f"{max(per_step, self.global_batch_size - self.global_batch_size % per_step)})"
        if self.global_batch_size > 0 and self.global_batch_size % dp == 0:
            fix += f", or data.micro_batch_size to one of {divisors(self.global_batch_size // dp)[:8]}"
        return [f"data.global_batch_size={self.global_batch_size} must be a positive multiple of "
                f"data.micro_batch_size={self.micro_batch_size} x dp={dp} = {per_step}: {fix}"]


@dataclass
class ParallelConfig:
    """Parallel degrees and modes: the one parallel-options type, read by the launch, the trainer,
    ``model.parallel.parallelize`` and the test harness (``testing.equivalence.Layout``).

    The world size must equal pp x dp x cp x tp (``config.layout``; ``distributed.ParallelDims`` is the
    runtime object built from these degrees by the same rules). cp is context parallelism: each cp rank
    holds S/cp tokens of every sequence (MLA attends over the cp group); the experts fold dp x cp x tp
    into edp x ep.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = -1  # -1: inferred from the world size
    cp: int = 1  # context parallelism: the sequence split over cp ranks (2*cp load-balanced chunks)
    sequence_parallel: bool = False
    pp_schedule: PipelineSchedule = PipelineSchedule.one_f_one_b
    pp_microbatches: int = 0  # 0: global batch / (micro-batch x dp)
    dp_mode: DPMode = DPMode.replicate
    zero_stage: int = 2  # DeepSpeed ZeRO stage (1 or 2) with dp_mode=deepspeed
    offload_optimizer: bool = False  # DeepSpeed ZeRO optimizer state on the CPU
    overlap_moe_comm: bool = True  # ScMoE: EP all-to-alls in flight under the dense branch
    moe_chunks: int = 1  # ScMoE with chunk: expert-parallel exchange in this many pipelined chunks
    moe_chunk_dim: MoEChunkDim = MoEChunkDim.expert  # chunks of local experts (divides N/ep) or of tokens
    moe_dispatcher: MoEDispatcher = MoEDispatcher.alltoall  # how EP moves tokens: alltoall | allgather

    @property
    def num_stages(self) -> int:
        """Pipeline stages in total: pp times the schedule's stages per rank (1 without PP)."""
        return self.pp * PipelineSchedule(self.pp_schedule).stages_per_rank if self.pp > 1 else 1

    def resolved_dp(self, world_size: int) -> int:
        """The data-parallel degree on ``world_size`` ranks (``dp=-1`` inferred). Raises ValueError (see
        ``config.layout.resolve_dp``)."""
        return resolve_dp(world_size, tp=self.tp, pp=self.pp, dp=self.dp, ep=self.ep, cp=self.cp)

    def validate(self, *, world_size: int) -> None:
        """The degrees on ``world_size`` ranks, and the combinations ``parallelize`` supports.

        Raises:
            ValueError: see ``config.layout.resolve_dp``.
            ConfigError: every other problem found: DeepSpeed with tp/ep/pp/cp or a ZeRO stage other
                than 1 or 2; cp with DeepSpeed or with sequence parallelism; moe_chunks < 1; moe_chunks > 1 with
                the all-gather dispatcher; pp_microbatches < 0.
        """
        self.resolved_dp(world_size)  # raises on degrees that do not fit
        dp_mode = DPMode(self.dp_mode)
        problems = []
        if self.cp > 1 and dp_mode is DPMode.deepspeed:
            problems.append(
                f"parallel.cp={self.cp} with parallel.dp_mode=deepspeed is not supported (DeepSpeed partitions over "
                "its own dp group only); use parallel.dp_mode=fsdp (shards over dp x cp) or replicate")
        if self.cp > 1 and self.sequence_parallel and self.tp > 1:
            problems.append(
                f"parallel.cp={self.cp} with parallel.sequence_parallel=true is not supported: context parallelism "
                "already splits the sequence; set parallel.sequence_parallel=false (tp with cp runs without SP)")
        if self.moe_chunks < 1:
            problems.append(f"parallel.moe_chunks={self.moe_chunks} must be >= 1 (1 = no split)")
        if self.moe_chunks > 1 and MoEDispatcher(self.moe_dispatcher) is MoEDispatcher.allgather:
            problems.append(
                f"parallel.moe_chunks={self.moe_chunks} with parallel.moe_dispatcher=allgather: chunked exchanges "
                "are implemented for the all-to-all dispatcher only; set parallel.moe_chunks=1 or "
                "parallel.moe_dispatcher=alltoall")
        if self.pp_microbatches < 0:
            problems.append(f"parallel.pp_microbatches={self.pp_microbatches} must be >= 0 (0 = derived)")
        if dp_mode is DPMode.deepspeed and (self.tp > 1 or self.ep > 1 or self.pp > 1 or self.cp > 1):
            problems.append(
                f"parallel.dp_mode=deepspeed supports data parallelism only (got parallel.tp={self.tp}, ep={self.ep}, "
                f"pp={self.pp}); use dp_mode=fsdp or dp_mode=replicate with tensor/expert/pipeline parallelism")
        if dp_mode is DPMode.deepspeed and self.zero_stage not in (1, 2):
            problems.append(f"parallel.zero_stage={self.zero_stage}: use 1 or 2 with dp_mode=deepspeed (stage 3 "
                            "shards parameters; use parallel.dp_mode=fsdp for that)")
        if problems:
            raise ConfigError(problems)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "longcat"
    name: str = ""
    dir: str = ""


@dataclass
class LoggingConfig:
    log_interval: int = 1  # steps between metric records and console lines
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False  # event files under <train.out_dir>/tensorboard (same metric names as wandb)
    # TFLOP/s per device that MFU is measured against; 0 = the bf16 peak of a known CUDA GPU when
    # train.bf16=true (longcat.train.throughput), else no MFU (TFLOP/s per device is always reported).
    peak_tflops: float = 0.0

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval={self.log_interval} must be >= 1 (log every N steps)")
        if self.peak_tflops < 0:
            raise ValueError(f"logging.peak_tflops={self.peak_tflops} must be >= 0 (the device's peak TFLOP/s; "
                             "0 = look the GPU up, or no MFU)")


@dataclass
class TrainConfig:
    steps: int = 300
    grad_accum: int = 0  # derived: global_batch / (micro_batch x dp); a non-zero value is checked
    seed: int = 42
    out_dir: str = "runs/default"
    checkpoint_interval: int = 100
    keep_last: int = 2
    resume: ResumeMode = ResumeMode.auto
    init_from: str = ""  # a checkpoint to load weights from (a new stage)
    eval_interval: int = 50
    eval_batches: int = 4
    bf16: bool = False
    activation_checkpointing: bool = False
    # torch.compile each decoder layer's dense blocks (MLA, SwiGLU, RMSNorm) and the MTP head; the MoE
    # stays eager (longcat.model.compile). CPU runs need a C++ compiler; the first step compiles.
    compile: bool = False
    device: Device = Device.cpu
    nonfinite_policy: NonFinitePolicy = NonFinitePolicy.skip
    # SIGTERM -> every rank checkpoints at the same step and exits 0; past this many seconds the process
    # exits 143 instead (keep it below the scheduler's grace period / torchrun --shutdown-timeout).
    preempt_timeout_s: float = 25.0

    def validate(self) -> None:
        """Checks of the train section.

        Raises:
            ConfigError: every problem found, each naming the value and the fix.
        """
        problems = []
        if self.steps <= 0:
            problems.append(f"train.steps={self.steps} must be positive")
        for name in ("checkpoint_interval", "eval_interval"):
            if getattr(self, name) < 0:
                problems.append(f"train.{name}={getattr(self, name)} must be >= 0 (0 disables)")
        if self.keep_last < 1:
            problems.append(f"train.keep_last={self.keep_last} must be >= 1")
        problems += _number_problems("train.preempt_timeout_s", self.preempt_timeout_s, positive=True)
        if self.grad_accum < 0:
            problems.append(f"train.grad_accum={self.grad_accum} must be >= 0 (0 = derived)")
        if problems:
            raise ConfigError(problems)


@dataclass
class FaultInjection:
    """Flip one bit of one element of one tensor on one rank at one step (testing SDC detection)."""

    step: int = -1  # -1: off
    rank: int = 0
    target: FaultTarget = FaultTarget.gradient
    tensor: str = ""
    index: int = 0  # flat element index (modulo numel)
    bit: int = 20  # 0..31 for fp32 (bits 23..30 are the exponent)


@dataclass
class SDCConfig:
    """Silent-data-corruption detection by deterministic replay (arXiv 2509.01322 §5.1)."""

    replay_interval: int = 0  # every N steps re-run a micro-batch's forward+backward and compare bits; 0 = off
    replay_microbatch: int = 0  # which micro-batch of the global batch to replay
    replica_interval: int = 0  # every N steps hash parameters that dp/edp replicas share; 0 = off
    policy: SDCPolicy = SDCPolicy.warn
    inject: FaultInjection = field(default_factory=FaultInjection)

    def validate(self, *, parallel: ParallelConfig, determinism_enabled: bool, checkpoint_interval: int) -> None:
        """Checks against the fields of the sibling sections it depends on (longcat.train.sdc_check)."""
        if min(self.replay_interval, self.replica_interval, self.replay_microbatch) < 0:
            raise ValueError(f"sdc.replay_interval={self.replay_interval}, sdc.replica_interval="
                             f"{self.replica_interval} and sdc.replay_microbatch={self.replay_microbatch} must be >= 0")
        if self.replay_interval and not determinism_enabled:
            raise ValueError(f"sdc.replay_interval={self.replay_interval} compares a recomputation bit for bit, "
                             "which needs determinism.enabled=true")
        if SDCPolicy(self.policy) is SDCPolicy.rollback and checkpoint_interval == 0:
            raise ValueError("sdc.policy=rollback reloads the last good checkpoint, but train.checkpoint_interval=0 "
                             "writes none; set a checkpoint interval or sdc.policy=halt")
        if self.inject.step >= 0 and not self.inject.tensor:
            raise ValueError(f"sdc.inject.step={self.inject.step} but sdc.inject.tensor is empty: name a module "
                             "(target=activation) or a parameter (gradient, parameter)")
        target = FaultTarget(self.inject.target)
        if self.inject.step >= 0 and target is not FaultTarget.parameter and (
                not self.replay_interval or self.inject.step % self.replay_interval):
            # the fault goes into the replay check's first pass: on any other step nothing would happen
            n = self.replay_interval
            when = (f"sdc.replay_interval={n} replays steps {n}, {2 * n}, ..." if n
                    else "sdc.replay_interval=0 replays none")
            raise ValueError(f"sdc.inject.target={target} at sdc.inject.step={self.inject.step} is injected into "
                             f"the replay check's first pass, and {when}: nothing would be injected; choose a "
                             "replayed step or set sdc.replay_interval (1 replays every step)")
        if self.inject.step >= 0 and target is FaultTarget.activation and self.inject.tensor.endswith(".mlp.router"):
            raise ValueError(f"sdc.inject.tensor={self.inject.tensor}: the router's output is a RouterOutput (ids, "
                             "gates, probabilities), not one tensor; inject into its linear layer "
                             f"({self.inject.tensor}.classifier)")


@dataclass
class DeterminismConfig:
    enabled: bool = False  # torch.use_deterministic_algorithms + fixed orders + per-(rank, purpose) seeds


@dataclass
class RunConfig:
    """A complete run: what one recipe composes to."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    determinism: DeterminismConfig = field(default_factory=DeterminismConfig)
    sdc: SDCConfig = field(default_factory=SDCConfig)


def num_grad_accum_steps(cfg: RunConfig, *, dp: int) -> int:
    return cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)


def mla_scales(cfg: ModelConfig) -> tuple[float, float]:
    """sqrt(hidden/q_lora_rank), sqrt(hidden/kv_lora_rank): the MLA variance alignment of §2.3.1."""
    return math.sqrt(cfg.hidden_size / cfg.q_lora_rank), math.sqrt(cfg.hidden_size / cfg.kv_lora_rank)


def run_config_from_dict(values: dict) -> RunConfig:
    """A typed ``RunConfig`` from a plain dict (e.g. the config stored in a checkpoint).

    Raises:
        ValueError: an unknown key or a value of the wrong type, naming it.
    """
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), values)
        run_config = OmegaConf.to_object(merged)
    except Exception as exc:
        raise ValueError(f"not a valid longcat run config: {exc}") from None
    assert isinstance(run_config, RunConfig)  # a structured RunConfig node converts to a RunConfig
    return run_config
