"""Context-parallel MLA: what each exchange costs (analytic, LongCat-Flash dims) and a measured step.

Three ways to give every cp rank the keys and values its local queries need (see
``MultiHeadLatentAttention._forward_context_parallel``, which implements (i)):

  (i)   all-gather the compressed KV state, latent + rotated rope key (C + R values per token), and
        expand it with ``kv_b_proj`` on every rank for the key prefix its queries can see;
  (ii)  all-gather the expanded K/V (H * (K + O) values per token; Llama 3's all-gather CP);
  (iii) pass K/V blocks around a ring in cp - 1 steps (Megatron's CP): the bytes of (ii), overlappable
        with the attention of the previous block; in backward K/V and their gradients travel (2x).

Analytic (per cp rank, per MLA block and per ScMoE decoder layer = 2 MLA blocks, one step = forward +
backward of B sequences): bytes each rank sends, forward and backward (a ring all-gather or
reduce-scatter sends (cp - 1) / cp of the gathered tensor per rank); the ``kv_b_proj`` FLOPs beyond
the single-device share (i: rank r expands (2cp - r) * L keys, recomputed in backward: 8 FLOPs per
weight scalar and key against 6 for its own N keys; ii, iii: each rank expands only its own keys);
the K/V state held for the backward; the attention FLOPs per rank for scale.

Measured (this machine, 2 gloo processes, one small MLA block, fp32): one forward + backward at the
same global sequence length, single device (rank 0 alone, the other rank waiting at a barrier) and
cp = 2 (both ranks), alternating in every round: step time (the slower rank), the RSS the forward
leaves allocated for the backward, the peak RSS above the step's start (``VmHWM`` reset through
``/proc/self/clear_refs``), and the bytes the CP all-gather and reduce-scatter actually move (the
tensors handed to gloo, counted at ``longcat.distributed.collectives``) against the formula.

Entry points: ``tools/bench_context_parallel.py`` (``--help``) and the suite (``tools/bench.py --only
context_parallel``); both write ``benchmarks/results/context_parallel.json`` (a ``BenchResult``).

Shape legend:
    B  sequences per micro-batch;  S  global sequence length;  N  S / cp local tokens;  L  N / 2
    H  heads;  C  kv_lora_rank;  R  qk_rope_head_dim;  A  qk_nope_head_dim;  O  v_head_dim;  K  A + R
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from longcat.bench.common import (
    BenchResult,
    Table,
    current_rss_mib,
    load_preset,
    peak_rss_mib,
    reset_peak_rss,
    return_freed_memory_to_os,
    write_result,
)
from longcat.bench.report import write_report
from longcat.config.schema import ModelConfig
from longcat.distributed import ParallelDims, ProcessGroups, collectives
from longcat.distributed.context_parallel import check_cp_seq_len, cp_local_positions, cp_split
from longcat.model.attention import ExpandedKV, MultiHeadLatentAttention
from longcat.model.flops import matmul_params_per_token
from longcat.model.rope import RotaryEmbedding
from longcat.testing.distributed import run_distributed

logger = logging.getLogger(__name__)

MIB = 2**20
SCHEMES = ("latent all-gather (i, ours)", "(i) with expanded K/V kept (ExpandedKV.KEEP)",
           "expanded K/V all-gather (ii)", "K/V ring (iii)")


@dataclass(frozen=True)
class ContextParallelBenchSettings:
    """The measured MLA block and step, and the analytic case (``--help`` of the CLI)."""

    hidden_size: int = 512
    num_attention_heads: int = 8
    q_lora_rank: int = 192
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    batch_size: int = 1
    seq_len: int = 4096
    rounds: int = 5
    warmup: int = 1
    threads: int = 1
    analytic_seq_lens: str = "32768,131072"
    analytic_cp: int = 8
    analytic_bytes_per_value: int = 2  # bf16

    def model_config(self) -> ModelConfig:
        cfg = ModelConfig(
            vocab_size=256, hidden_size=self.hidden_size, num_layers=1, num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=256, q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
            n_routed_experts=4, zero_expert_num=0, moe_topk=2, expert_ffn_hidden_size=64,
        )
        cfg.validate()
        return cfg


QUICK: dict[str, Any] = {"seq_len": 512, "rounds": 1, "warmup": 1}
VARIANTS = ("cp1", "cp2", "cp2_keep")
VARIANT_LABELS = {"cp1": "single device (cp=1)", "cp2": "cp=2, expanded K/V recomputed (default), slowest rank",
                  "cp2_keep": "cp=2, expanded K/V kept, slowest rank"}


# ----------------------------------------------------------------------------------- analytic


@dataclass(frozen=True)
class ExchangeCost:
    """One scheme's cost per cp rank, per MLA block, per step (forward + backward of B sequences).

    values_per_token: values exchanged per token. forward_bytes / backward_bytes: sent by each rank.
    extra_kv_b_flops_max / _mean: ``kv_b_proj`` FLOPs beyond the single-device share (6 * N keys),
    on the busiest rank / averaged over ranks. held_kv_bytes: K/V state held for the backward on
    the busiest rank. attention_flops: causal attention model FLOPs per rank (6 * B * S^2 * H * (K + O) / 2 / cp).
    layer_flops: model FLOPs of one ScMoE decoder layer per rank and step (its matmuls over the N local
    tokens with ``ffn_experts_per_token`` FFN experts, plus its 2 blocks' attention), for scale.
    """

    scheme: str
    values_per_token: int
    forward_bytes: float
    backward_bytes: float
    extra_kv_b_flops_max: float
    extra_kv_b_flops_mean: float
    held_kv_bytes: float
    attention_flops: float
    layer_flops: float


# LongCat-Flash activates ~27B parameters per token on average: about 8 FFN experts of the top-12 per
# layer (arXiv 2509.01322 §2.1 gives 18.6B-31.3B; the paper never prints the mean expert count).
LONGCAT_FLASH_FFN_EXPERTS_PER_TOKEN = 8.0


def exchange_costs(cfg: ModelConfig, *, seq_len: int, cp: int, batch_size: int = 1, bytes_per_value: int = 2,
                   ffn_experts_per_token: float = LONGCAT_FLASH_FFN_EXPERTS_PER_TOKEN) -> list[ExchangeCost]:
    """The ``SCHEMES``' ``ExchangeCost`` for MLA dims ``cfg`` at global length ``seq_len`` over ``cp`` ranks.

    Raises:
        ValueError: seq_len not divisible by 2 * cp (see ``check_cp_seq_len``).
    """

    check_cp_seq_len(seq_len, cp)
    B, S, H, w = batch_size, seq_len, cfg.num_attention_heads, bytes_per_value
    N, L = S // cp, S // (2 * cp)
    K, O = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    expanded = H * (K + O)
    kv_b_weight = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + O)  # scalars of kv_b_proj
    own_share = 6 * B * N * kv_b_weight  # forward 2 + backward 4 per scalar and key, own keys only
    prefix_keys = [(2 * cp - r) * L for r in range(cp)]  # keys rank r expands (its high chunk's prefix)
    latent_flops = [8 * B * keys * kv_b_weight for keys in prefix_keys]  # + 2: recomputed in backward
    keep_flops = [6 * B * keys * kv_b_weight for keys in prefix_keys]
    attention = 6 * B * S * S * H * (K + O) / 2 / cp
    one_layer = dataclasses.replace(cfg, num_layers=1, mtp_num_layers=0)
    layer_params = (matmul_params_per_token(one_layer, ffn_experts_per_token=min(ffn_experts_per_token, cfg.moe_topk))
                    - cfg.vocab_size * cfg.hidden_size)  # without the LM head
    layer = 6 * B * N * layer_params + 2 * attention
    sent = (cp - 1) * B * N * w  # bytes per exchanged value per token, sent by each rank (ring collectives)
    return [
        ExchangeCost(SCHEMES[0], latent, sent * latent, sent * latent, max(latent_flops) - own_share,
                     statistics.fmean(latent_flops) - own_share, B * S * latent * w, attention, layer),
        ExchangeCost(SCHEMES[1], latent, sent * latent, sent * latent, max(keep_flops) - own_share,
                     statistics.fmean(keep_flops) - own_share, B * (S * latent + max(prefix_keys) * expanded) * w,
                     attention, layer),
        ExchangeCost(SCHEMES[2], expanded, sent * expanded, sent * expanded, 0.0, 0.0,
                     B * max(prefix_keys) * expanded * w, attention, layer),
        ExchangeCost(SCHEMES[3], expanded, sent * expanded, 2 * sent * expanded, 0.0, 0.0,
                     B * N * expanded * w, attention, layer),
    ]


def analytic_table(cfg: ModelConfig, settings: ContextParallelBenchSettings) -> tuple[Table, dict[str, float]]:
    seq_lens = [int(s) for s in settings.analytic_seq_lens.split(",") if s.strip()]
    cp, w = settings.analytic_cp, settings.analytic_bytes_per_value
    rows, metrics = [], {}
    for S in seq_lens:
        costs = exchange_costs(cfg, seq_len=S, cp=cp, bytes_per_value=w)
        for cost in costs:
            rows.append([
                f"{S // 1024}k", cost.scheme, cost.values_per_token, round(cost.forward_bytes / MIB, 1),
                round(cost.backward_bytes / MIB, 1), round(2 * (cost.forward_bytes + cost.backward_bytes) / MIB, 1),
                round(cost.extra_kv_b_flops_max / 1e9, 1), round(cost.extra_kv_b_flops_mean / 1e9, 1),
                f"{100 * cost.extra_kv_b_flops_max / cost.attention_flops:.1f}%",
                f"{100 * 2 * cost.extra_kv_b_flops_max / cost.layer_flops:.1f}%",
                round(cost.held_kv_bytes / MIB, 1), round(cost.attention_flops / 1e12, 1),
            ])
        ours, expanded = costs[0], costs[2]
        key = f"longcat_flash_{S // 1024}k_cp{cp}"
        metrics[f"{key}_latent_fwd_mib_per_block"] = ours.forward_bytes / MIB
        metrics[f"{key}_expanded_fwd_mib_per_block"] = expanded.forward_bytes / MIB
        metrics[f"{key}_bytes_ratio_expanded_over_latent"] = expanded.forward_bytes / ours.forward_bytes
        metrics[f"{key}_latent_extra_kv_b_share_of_attention"] = ours.extra_kv_b_flops_max / ours.attention_flops
        metrics[f"{key}_keep_extra_kv_b_share_of_attention"] = costs[1].extra_kv_b_flops_max / ours.attention_flops
        metrics[f"{key}_latent_extra_kv_b_share_of_layer"] = 2 * ours.extra_kv_b_flops_max / ours.layer_flops
    table = Table(
        title=(f"Exchange per cp rank, LongCat-Flash MLA (H={cfg.num_attention_heads}, C={cfg.kv_lora_rank}, "
               f"R={cfg.qk_rope_head_dim}, K={cfg.qk_head_dim}, O={cfg.v_head_dim}), cp={cp}, "
               f"{8 * w}-bit values, 1 sequence per step (analytic)"),
        columns=["S", "scheme", "values / token", "fwd MiB / block", "bwd MiB / block", "MiB / layer / step",
                 "extra kv_b GFLOP (busiest rank)", "extra kv_b GFLOP (mean rank)", "extra / attention FLOPs",
                 "extra / layer FLOPs",
                 "K/V held for bwd MiB", "attention TFLOP / rank"],
        rows=rows,
    )
    return table, metrics


# ----------------------------------------------------------------------------------- measured


class _ByteCounter:
    """Counts the bytes handed to the all-gather and reduce-scatter of ``longcat.distributed.collectives``."""

    def __init__(self) -> None:
        self.all_gather_bytes = 0
        self.reduce_scatter_bytes = 0
        self.enabled = False

    def install(self, group_size: int) -> None:

        gather, scatter = collectives._all_gather_single, collectives._reduce_scatter_single

        def counted_gather(out, x, group=None):
            if self.enabled:  # a ring all-gather sends the local part to cp - 1 peers
                self.all_gather_bytes += (group_size - 1) * x.numel() * x.element_size()
            return gather(out, x, group=group)

        def counted_scatter(out, x, group=None):
            if self.enabled:  # a ring reduce-scatter sends (cp - 1) / cp of the input
                self.reduce_scatter_bytes += (group_size - 1) * out.numel() * out.element_size()
            return scatter(out, x, group=group)

        collectives._all_gather_single, collectives._reduce_scatter_single = counted_gather, counted_scatter


def _rank_main(settings: ContextParallelBenchSettings) -> dict[str, Any]:
    """One rank of the measurement (under ``run_distributed``): alternating single-device and cp steps."""

    return_freed_memory_to_os()
    torch.set_num_threads(settings.threads)

    world_size = int(os.environ["WORLD_SIZE"])
    groups = ProcessGroups.build(ParallelDims(world_size, cp=world_size))  # every rank in one cp group
    group = groups.cp_group
    rank, cp = groups.cp_rank, groups.cp_size
    cfg = settings.model_config()
    B, S, D = settings.batch_size, settings.seq_len, cfg.hidden_size
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(cfg)
    gen = torch.Generator().manual_seed(1)
    x_BSD, g_BSD = torch.randn(B, S, D, generator=gen), torch.randn(B, S, D, generator=gen)
    rope = RotaryEmbedding(cfg.qk_rope_head_dim, theta=1e4)
    cpu = torch.device("cpu")
    full = (x_BSD, g_BSD, *rope(None, seq_len=S, device=cpu, dtype=torch.float32))
    positions_1N = cp_local_positions(S, cp_rank=rank, cp=cp)[None]
    local = (cp_split(x_BSD, cp_rank=rank, cp=cp), cp_split(g_BSD, cp_rank=rank, cp=cp),
             *rope(positions_1N, seq_len=S // cp, device=cpu, dtype=torch.float32))
    counter = _ByteCounter()
    counter.install(cp)

    def step(variant: str) -> Optional[dict[str, float]]:
        if variant == "cp1" and rank != 0:
            return None
        mla.cp_group = None if variant == "cp1" else group
        mla.cp_expanded_kv = ExpandedKV.KEEP if variant == "cp2_keep" else ExpandedKV.RECOMPUTE
        x, g, cos, sin = full if variant == "cp1" else local
        mla.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        gc.collect()
        rss0 = current_rss_mib()
        reset_peak_rss()
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = mla(x, cos_BSP=cos, sin_BSP=sin)
        t1 = time.perf_counter()
        held = current_rss_mib() - rss0 - out.numel() * out.element_size() / MIB
        out.backward(g)
        t2, cpu2 = time.perf_counter(), time.process_time()
        peak = peak_rss_mib() - rss0
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t2 - t0, "step_cpu_s": cpu2 - cpu0,
                "held_mib": held, "peak_mib": peak}

    results: dict[str, list] = {variant: [] for variant in VARIANTS}
    for round_idx in range(settings.warmup + settings.rounds):
        shift = round_idx % len(VARIANTS)  # rotate the order: a slow spell hits every variant
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            dist.barrier(group=group)
            counter.enabled = variant == "cp2" and round_idx == 0
            measured = step(variant)
            counter.enabled = False
            dist.barrier(group=group)
            if round_idx >= settings.warmup and measured is not None:
                results[variant].append(measured)
    return {"rank": rank, "results": results, "all_gather_bytes": counter.all_gather_bytes,
            "reduce_scatter_bytes": counter.reduce_scatter_bytes}


def _median(ranks: list[dict], variant: str, key: str, combine=max) -> float:
    """Median over rounds of ``combine`` over the ranks that ran ``variant``."""
    per_rank = [r["results"][variant] for r in ranks if r["results"][variant]]
    return statistics.median(combine(rounds[i][key] for rounds in per_rank) for i in range(len(per_rank[0])))


def measured_tables(ranks: list[dict], settings: ContextParallelBenchSettings) -> tuple[list[Table], dict[str, float]]:
    cfg = settings.model_config()
    rows, metrics = [], {}
    for variant, label in VARIANT_LABELS.items():
        values = {k: _median(ranks, variant, k)
                  for k in ("step_s", "step_cpu_s", "forward_s", "backward_s", "held_mib", "peak_mib")}
        rows.append([label, round(1e3 * values["step_s"], 1), round(1e3 * values["step_cpu_s"], 1),
                     round(1e3 * values["forward_s"], 1), round(1e3 * values["backward_s"], 1),
                     round(values["held_mib"], 1), round(values["peak_mib"], 1)])
        metrics.update({f"{variant}_{k}": v for k, v in values.items()})
    for variant in ("cp2", "cp2_keep"):
        for key in ("step_s", "step_cpu_s", "held_mib", "peak_mib"):
            if metrics[f"cp1_{key}"] > 0:  # a tiny (--quick) block may not move RSS at all
                metrics[f"{variant}_over_cp1_{key}"] = metrics[f"{variant}_{key}"] / metrics[f"cp1_{key}"]
        rows.append([f"ratio {variant} / cp1"] + [
            round(metrics[f"{variant}_over_cp1_{k}"], 3) if f"{variant}_over_cp1_{k}" in metrics else ""
            for k in ("step_s", "step_cpu_s", "", "", "held_mib", "peak_mib")])
    step = Table(
        title=(f"One MLA block forward + backward, B={settings.batch_size} x S={settings.seq_len}, fp32, "
               f"{settings.threads} thread(s) per rank (measured, median of {settings.rounds} rounds)"),
        columns=["variant", "step ms", "step CPU ms", "forward ms", "backward ms", "held for backward MiB",
                 "peak above start MiB"],
        rows=rows,
    )
    formula = exchange_costs(cfg, seq_len=settings.seq_len, cp=2, batch_size=settings.batch_size, bytes_per_value=4)
    sent_fwd = max(r["all_gather_bytes"] for r in ranks)
    sent_bwd = max(r["reduce_scatter_bytes"] for r in ranks)
    metrics.update({"cp2_all_gather_bytes_per_rank": sent_fwd, "cp2_reduce_scatter_bytes_per_rank": sent_bwd,
                    "cp2_bytes_match_formula": (sent_fwd, sent_bwd) == (formula[0].forward_bytes,
                                                                        formula[0].backward_bytes)})
    exchange = Table(
        title="Bytes each rank sends per MLA block and step at the measured dims, cp=2, fp32",
        columns=["exchange", "forward bytes", "backward bytes", "source"],
        rows=[[SCHEMES[0], sent_fwd, sent_bwd, "counted at the collectives"],
              [SCHEMES[0], int(formula[0].forward_bytes), int(formula[0].backward_bytes), "formula"],
              [SCHEMES[2], int(formula[2].forward_bytes), int(formula[2].backward_bytes), "formula"],
              [SCHEMES[3], int(formula[3].forward_bytes), int(formula[3].backward_bytes), "formula"]],
    )
    return [step, exchange], metrics


# ----------------------------------------------------------------------------------- entry points


def run_with(settings: ContextParallelBenchSettings, *, timeout_s: float = 1800.0) -> BenchResult:
    """The analytic tables and the 2-process measurement as one ``BenchResult`` (name ``context_parallel``)."""

    started = time.monotonic()
    longcat_flash = load_preset("longcat_flash")
    analytic, metrics = analytic_table(longcat_flash, settings)
    ranks = run_distributed(_rank_main, world_size=2, args=(settings,), timeout_s=timeout_s)
    tables, measured = measured_tables(ranks, settings)
    metrics.update(measured)
    cfg = settings.model_config()
    ratio = (longcat_flash.num_attention_heads * (longcat_flash.qk_head_dim + longcat_flash.v_head_dim)
             / (longcat_flash.kv_lora_rank + longcat_flash.qk_rope_head_dim))
    notes = [
        "Choice: (i), the all-gather of the compressed latent + rope key, exact, with stock SDPA. It sends "
        f"{ratio:.1f}x fewer bytes than (ii) or (iii), on links that LongCat-Flash already loads with the MoE "
        "all-to-all (CP=8 sits inside the EP group of 32, arXiv 2509.01322 §5.3), and holds only [B, S, C + R] "
        "for the backward. Its price is kv_b_proj work on the key prefix (busiest rank: all S keys; forward, "
        "recompute and backward): the 'extra / attention FLOPs' and 'extra / layer FLOPs' columns, GEMM work "
        "on the device rather than traffic on the link. A ring (iii) can hide its bytes behind the attention "
        "at 128k, but sends them again in backward and needs a log-sum-exp merge of partial attentions.",
        "Analytic: bytes each rank sends with ring collectives ((cp-1)/cp of the gathered tensor); per layer = 2 "
        "MLA blocks, forward + backward. (ii) and (iii) count 20,480 values per token for the expanded K and V "
        "(16,448 if the shared rope key travelled once). K/V held for backward: (i) the gathered latent, plus "
        "with KEEP the busiest rank's expanded prefix; (ii) the gathered K/V of that prefix; (iii) the local "
        "K/V (the ring re-sends K/V in backward). With RECOMPUTE, (i) still holds the busiest rank's expanded "
        "prefix transiently while one block runs (not counted).",
        "Measured: single device = rank 0 alone on the whole sequence (rank 1 waits at a barrier); cp=2 = both "
        "ranks on their halves; the variants rotate order every round. Held for backward = RSS after the "
        "forward minus before, less the output; peak = VmHWM (reset via /proc/self/clear_refs) minus the RSS at "
        "the step's start; glibc's mmap threshold is fixed at 1 MiB so freed tensors leave RSS. Step CPU ms "
        "(process CPU time of the slower rank, gloo's threads included) is the work per rank; wall time also "
        "counts waiting for the peer and, for cp=2, needs both cores at once, which a machine shared with "
        "other jobs may not give (compare the two columns and the load average).",
        f"On CPU, SDPA runs its math kernel here (qk head dim {cfg.qk_head_dim} != v head dim {cfg.v_head_dim}), "
        "which materialises the [S_q, S_k] probabilities and holds them for the backward: the single-device "
        "block holds [S, S] of them, a cp rank [L, (r+1)L] + [L, (2cp-r)L] (KEEP) or none (RECOMPUTE). A GPU "
        "kernel (flash / memory-efficient attention) holds none, so there the saving is in K/V and projections.",
    ]
    return BenchResult(
        name="context_parallel",
        title="Context parallelism for MLA: latent all-gather vs expanded K/V vs ring (cp=2 measured, 2 processes)",
        metrics=metrics, tables=[analytic, *tables], settings=dataclasses.asdict(settings), notes=notes,
        wall_s=time.monotonic() - started,
    )


def run(*, quick: bool) -> BenchResult:
    """Suite entry (``tools/bench.py --only context_parallel``)."""
    settings = ContextParallelBenchSettings(**(QUICK if quick else {}))
    return run_with(settings)


def parse_args(argv: Optional[list[str]] = None) -> tuple[ContextParallelBenchSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Writes <output>/context_parallel.json and regenerates --docs.")
    for field in dataclasses.fields(ContextParallelBenchSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            help=f"default {field.default}")
    parser.add_argument("--quick", action="store_true", help=f"tiny settings (smoke test): {QUICK}")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"),
                        help="folder for context_parallel.json (default: benchmarks/results)")
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown report regenerated from every JSON in --output (default: docs/benchmarks.md)")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate the markdown report")
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(ContextParallelBenchSettings)
                   if getattr(args, f.name) is not None})
    return ContextParallelBenchSettings(**values), args


def main(argv: Optional[list[str]] = None) -> int:
    """``tools/bench_context_parallel.py``: run, write the JSON, regenerate the report."""

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings, args = parse_args(argv)
    result = run_with(settings)
    result.mode = "quick" if args.quick else "full"
    path = write_result(result, args.output)
    print(json.dumps(result.metrics, indent=2))
    print(f"wrote {path}")
    if not args.no_docs:
        print(f"wrote {write_report(args.output, args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
