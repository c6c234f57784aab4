"""LongCat-shaped MoE configs against two peers: transformers (the reference) and torchtitan (DeepSeek-V3).

Configs at LongCat-Flash granularity (arXiv 2509.01322 §2.1): >= 64 FFN experts with half as many
zero experts, top-8 and top-12, expert FFN width ~ hidden/3 (176 at hidden 512, a multiple of 8),
on the ``small`` preset's MLA and dense FFNs, 2048 tokens per step, fp32, one thread.

Two measurements per config, each side by side in one process, the implementations alternating in
every round so a slow spell of a shared machine hits all of them:

- MoE block forward + backward on the same normed input ``[B, S, D]`` and output gradient: ours
  (``model.moe.MoE``), transformers' ``LongcatFlashMoE`` with the same weights, torchtitan's ``MoE``
  with N experts and top-k_e (k_e = K * N / (N + Z), LongCat's expected FFN experts per token, so
  the expert FLOPs match), with ``use_grouped_mm`` (experts in bf16: torchtitan casts) and without
  (its fp32 per-expert loop). Ours runs twice: fp32, and under bf16 autocast (``train.bf16``: experts
  in bf16, router in fp32), the precision of torchtitan's grouped_mm path, which the matched-precision
  table compares.
- the full training step (forward, mean CE, backward, AdamW): ours, transformers, and torchtitan's
  DeepSeek-V3 at matched dimensions and FLOPs (``torchtitan_peer.build_deepseek_v3``).

Reported per implementation: median step time, tokens/s, model GFLOP/s (``model.flops``), peak
memory of the step above its start (``VmHWM`` reset through ``/proc/self/clear_refs``; glibc's mmap
threshold fixed at 1 MiB so freed tensors leave RSS; ours' plus its MoE workspace, which it keeps
from call to call), and ours' speed ratio to each peer (peer time / ours, > 1 = ours faster) as the
median of per-round ratios. For ours, the host synchronisations of
one step (``count_host_syncs``: the Python-level calls that make a CUDA host wait for the device).

What bounds ours: one more call of ours' block and step under ``torch.profiler`` splits the aten
operator self time into GEMMs (``profile.MATMUL_OPS``) and the rest; the GEMM floor is ours' median
time x the GEMM share (ours with every non-GEMM operator removed, the GEMMs as fast as now), and the
ceiling against a peer is its time over that floor: a target above the ceiling cannot be reached by
removing non-GEMM work, only by faster GEMMs.

torchtitan is optional (``LONGCAT_TORCHTITAN_PATH``); without it its columns are absent and the
notes say why.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, cast

import torch
from torch.overrides import TorchFunctionMode

from longcat.bench import torchtitan_peer
from longcat.bench.common import (
    BenchResult,
    KernelCost,
    Table,
    current_rss_mib,
    load_preset,
    peak_rss_mib,
    reset_peak_rss,
    return_freed_memory_to_os,
)
from longcat.bench.profile import op_group, profile_step
from longcat.bench.training import BENCH_OPTIM, OursStep, ReferenceStep, build_ours, build_reference, make_batch
from longcat.config.schema import ModelConfig
from longcat.model.compile import compile_dense_blocks
from longcat.model.flops import step_flops
from longcat.model.moe import workspace
from longcat.train import losses


@dataclass(frozen=True)
class PeerConfig:
    """N FFN experts, Z zero experts, top-K."""

    n_routed_experts: int
    zero_expert_num: int
    moe_topk: int

    @property
    def name(self) -> str:
        return f"{self.n_routed_experts}+{self.zero_expert_num} top-{self.moe_topk}"

    @property
    def ffn_experts_per_token(self) -> int:
        """k_e = K * N / (N + Z) rounded: torchtitan's top-k at matched expert FLOPs."""
        return max(1, round(self.moe_topk * self.n_routed_experts / (self.n_routed_experts + self.zero_expert_num)))


CONFIGS = (PeerConfig(64, 32, 8), PeerConfig(64, 32, 12), PeerConfig(128, 64, 12))


@dataclass(frozen=True)
class PeersSettings:
    preset: str = "small"
    expert_ffn_hidden_size: int = 176
    batch_size: int = 8
    seq_len: int = 256
    block_rounds: int = 3
    step_rounds: int = 3
    configs: tuple[PeerConfig, ...] = CONFIGS
    # torchtitan's fp32 loop is timed in the block only, up to this many experts: its backward zero-fills
    # a full [N, F, D] gradient per expert and weight (N^2 cost, seconds per call)
    torchtitan_loop_max_experts: int = 64
    # ours' step also with its dense blocks compiled (train.compile; longcat.model.compile); the peers eager
    compile_ours: bool = True
    seed: int = 0

    @classmethod
    def for_mode(cls, *, quick: bool) -> PeersSettings:
        if quick:
            return cls(batch_size=2, seq_len=64, block_rounds=1, step_rounds=1, configs=CONFIGS[1:2],
                       compile_ours=False)
        return cls()

    def model_config(self, peer: PeerConfig) -> ModelConfig:
        base = load_preset(self.preset)
        return dataclasses.replace(base, n_routed_experts=peer.n_routed_experts, zero_expert_num=peer.zero_expert_num,
                                   moe_topk=peer.moe_topk, expert_ffn_hidden_size=self.expert_ffn_hidden_size,
                                   routed_scaling_factor=base.ffn_hidden_size / self.expert_ffn_hidden_size)


# ----------------------------------------------------------------------------------- measuring

_SYNC_METHODS = frozenset({"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero",
                           "masked_select", "unique", "unique_consecutive", "argwhere"})


class count_host_syncs(TorchFunctionMode):
    """Counts calls that need a tensor's value on the host (on CUDA: a device synchronisation):
    ``item``, ``tolist``, ``int()``/``float()``/``bool()`` of a tensor, ``nonzero``, boolean-mask
    indexing, ``repeat_interleave`` without ``output_size``... ``counts`` maps each to its calls.
    Sees Python-level calls only (the model's and its autograd Functions' code), which is where they
    are written."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _SYNC_METHODS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                     and len(args) > 1 and isinstance(args[1], torch.Tensor)) \
                or (name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor)
                    and args[1].dtype == torch.bool):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Sample:
    seconds: float
    peak_above_start_mib: float
    faulted_mib: float = 0.0  # memory faulted in from the OS (minor page faults x page size)
    kernel_seconds: float = 0.0  # system CPU time (mostly those faults: the kernel zero-fills each page)


def measure(fn: Callable[[], Any], *, held_mib: Callable[[], float] | None = None) -> Sample:
    """One call of ``fn``: wall seconds, the RSS peak above the RSS at its start (plus ``held_mib()``:
    memory ``fn`` keeps between calls, already in the start RSS, e.g. ours' MoE workspace), the memory
    faulted in and the kernel CPU time it took."""
    held = held_mib() if held_mib is not None else 0.0  # before the call: what it grows shows in the RSS peak
    reset_peak_rss()
    start_rss = current_rss_mib()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    cost = KernelCost.between(usage, resource.getrusage(resource.RUSAGE_SELF))
    return Sample(seconds, max(0.0, peak_rss_mib() - start_rss) + held, cost.faulted_mib, cost.kernel_s)


def _ours_workspace_mib() -> float:
    return workspace.held_bytes() / 2**20


def alternate(impls: dict[str, Callable[[], Any]], *, rounds: int) -> dict[str, list[Sample]]:
    """One warm-up call each, then ``rounds`` rounds calling every implementation once, in turn. Ours'
    peaks include the MoE workspace (``longcat.model.moe.workspace``: kept from call to call, so in the
    RSS at a call's start)."""
    for fn in impls.values():
        fn()
    samples: dict[str, list[Sample]] = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            samples[name].append(measure(fn, held_mib=_ours_workspace_mib if name in _OURS else None))
    return samples


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio_to(samples: dict[str, list[Sample]], peer: str, ours: str = "ours") -> float:
    """Median over rounds of peer time / our time (> 1: ours faster)."""
    return _median([p.seconds / o.seconds for p, o in zip(samples[peer], samples[ours])])


# ----------------------------------------------------------------------------------- the pieces

def _block_fwd_bwd(block: torch.nn.Module, x_BSD: torch.Tensor, grad_BSD: torch.Tensor, *,
                   bf16_autocast: bool = False) -> Callable[[], None]:
    def run() -> None:
        block.zero_grad(set_to_none=True)
        x = x_BSD.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_BSD)
    return run


OURS_BF16 = "ours bf16 autocast"
OURS_COMPILED = "ours compiled"
TITAN_COMPILED = "torchtitan grouped_mm compiled"
_OURS = ("ours", OURS_BF16, OURS_COMPILED)


class TorchTitanStep:
    """DeepSeek-V3 step: forward, mean CE (``losses.cross_entropy_sum`` / tokens), backward, AdamW
    (``BENCH_OPTIM``'s lr, betas, eps and weight decay on every parameter)."""

    def __init__(self, model: torch.nn.Module, *, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor) -> None:
        self.model = model
        self.input_ids_BS, self.labels_BS = input_ids_BS, labels_BS
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=BENCH_OPTIM.lr, betas=tuple(BENCH_OPTIM.betas),
                                           eps=BENCH_OPTIM.eps, weight_decay=BENCH_OPTIM.weight_decay)

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        logits_BSV = self.model(self.input_ids_BS)
        loss = losses.cross_entropy_sum(logits_BSV, self.labels_BS) / self.labels_BS.numel()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def gemm_share(fn: Callable[[], Any]) -> float:
    """The GEMMs' share of the aten operator self time of one profiled call of ``fn``."""
    per_op = profile_step(fn)
    total = sum(seconds for seconds, _ in per_op.values())
    return sum(seconds for name, (seconds, _) in per_op.items() if op_group(name) == "matmul") / total if total else 0.0


def _row(name: str, samples: list[Sample], *, tokens: int, flops: float) -> list:
    seconds = _median([s.seconds for s in samples])
    return [name, round(seconds * 1e3, 1), round(tokens / seconds), round(flops / seconds / 1e9, 2),
            round(max(s.peak_above_start_mib for s in samples), 1), round(_median([s.faulted_mib for s in samples])),
            f"{_median([s.kernel_seconds / s.seconds for s in samples]):.0%}"]


def run_config(peer: PeerConfig, s: PeersSettings, tt: Optional[torchtitan_peer.TorchTitan]) -> tuple[dict, list]:
    """Block and step measurements of one config -> (metrics, [block table rows, step table rows])."""
    cfg = s.model_config(peer)
    tokens = s.batch_size * s.seq_len
    batch = make_batch(cfg, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed)
    ours_model = build_ours(cfg, seed=s.seed)
    reference_model = build_reference(cfg, state_dict=ours_model.state_dict())
    k_e = peer.ffn_experts_per_token
    flops = step_flops(cfg, batch_size=s.batch_size, seq_len=s.seq_len, ffn_experts_per_token=float(k_e))
    moe_flops = 3 * 2 * tokens * (3 * cfg.hidden_size * cfg.expert_ffn_hidden_size * k_e
                                  + cfg.hidden_size * cfg.num_experts_total)
    gen = torch.Generator().manual_seed(s.seed)
    x_BSD = torch.randn(s.batch_size, s.seq_len, cfg.hidden_size, generator=gen)
    grad_BSD = torch.randn(s.batch_size, s.seq_len, cfg.hidden_size, generator=gen)

    ours_block = cast(torch.nn.Module, ours_model.model.layers[0].mlp)
    blocks: dict[str, Callable[[], None]] = {
        "ours": _block_fwd_bwd(ours_block, x_BSD, grad_BSD),
        # train.bf16's precision: experts in bf16, router fp32 (torchtitan grouped_mm's precision)
        OURS_BF16: _block_fwd_bwd(ours_block, x_BSD, grad_BSD, bf16_autocast=True),
        "transformers": _block_fwd_bwd(reference_model.model.layers[0].mlp, x_BSD, grad_BSD),
    }
    if tt is not None:
        variants = ((True, "torchtitan grouped_mm"),) + (
            ((False, "torchtitan fp32 loop"),) if peer.n_routed_experts <= s.torchtitan_loop_max_experts else ())
        for grouped, label in variants:
            blocks[label] = _block_fwd_bwd(torchtitan_peer.build_moe(tt, cfg, top_k=k_e, grouped_mm=grouped,
                                                                     seed=s.seed), x_BSD, grad_BSD)
    block_samples = alternate(blocks, rounds=s.block_rounds)

    ours_step = OursStep(ours_model, batch=batch)
    steps: dict[str, Callable[[], Any]] = {"ours": ours_step}
    if s.compile_ours:  # the same weights; its warm-up call compiles
        compiled_model = build_ours(cfg, seed=s.seed)
        compile_dense_blocks(compiled_model)
        steps[OURS_COMPILED] = OursStep(compiled_model, batch=batch)
    steps["transformers"] = ReferenceStep(reference_model, batch=batch, model_cfg=cfg)
    if tt is not None:
        for grouped, label in ((True, "torchtitan grouped_mm"),):
            steps[label] = TorchTitanStep(
                torchtitan_peer.build_deepseek_v3(tt, cfg, top_k=k_e, grouped_mm=grouped, seq_len=s.seq_len,
                                                  seed=s.seed),
                input_ids_BS=batch.input_ids_BS, labels_BS=batch.labels_BS)
        if s.compile_ours:  # compiled as torchtitan compiles it: each transformer block
            steps[TITAN_COMPILED] = TorchTitanStep(
                torchtitan_peer.compile_blocks(torchtitan_peer.build_deepseek_v3(
                    tt, cfg, top_k=k_e, grouped_mm=True, seq_len=s.seq_len, seed=s.seed)),
                input_ids_BS=batch.input_ids_BS, labels_BS=batch.labels_BS)
    with count_host_syncs() as syncs:  # the layers, the loss and the backward; not AdamW's step counters
        ours_model(ours_step.input_ids_BS, labels_BS=ours_step.labels_BS).ce_sum.backward()
    ours_model.zero_grad(set_to_none=True)
    step_samples = alternate(steps, rounds=s.step_rounds)

    key = f"{peer.n_routed_experts}_{peer.zero_expert_num}_top{peer.moe_topk}"
    metrics: dict[str, float] = {f"{key}_ours_host_syncs_per_step": syncs.total}
    bound_rows = []
    for kind, samples, fn in (("block", block_samples, blocks["ours"]), ("step", step_samples, ours_step)):
        share = gemm_share(fn)
        floor_ms = _median([x.seconds for x in samples["ours"]]) * 1e3 * share
        metrics[f"{key}_{kind}_ours_gemm_share"] = share
        metrics[f"{key}_{kind}_ours_gemm_floor_ms"] = floor_ms
        ceilings = {}
        for name in ("transformers", "torchtitan grouped_mm"):
            if name in samples:
                ceilings[name] = _median([x.seconds for x in samples[name]]) * 1e3 / floor_ms
                metrics[f"{key}_{kind}_ours_ceiling_vs_{name.replace(' ', '_')}"] = ceilings[name]
        bound_rows.append([peer.name, kind, f"{share:.1%}", round(floor_ms, 1),
                           *(f"{ceilings[n]:.2f}x" if n in ceilings else "-"
                             for n in ("transformers", "torchtitan grouped_mm"))])
    for kind, samples in (("block", block_samples), ("step", step_samples)):
        for name in samples:
            slug = name.replace(" ", "_")
            metrics[f"{key}_{kind}_{slug}_ms"] = _median([x.seconds for x in samples[name]]) * 1e3
            metrics[f"{key}_{kind}_{slug}_peak_mib"] = max(x.peak_above_start_mib for x in samples[name])
            metrics[f"{key}_{kind}_{slug}_faulted_mib"] = _median([x.faulted_mib for x in samples[name]])
            metrics[f"{key}_{kind}_{slug}_kernel_share"] = _median([x.kernel_seconds / x.seconds
                                                                    for x in samples[name]])
            if name not in _OURS:
                metrics[f"{key}_{kind}_ours_vs_{slug}"] = ratio_to(samples, name)
                if OURS_COMPILED in samples:
                    metrics[f"{key}_{kind}_ours_compiled_vs_{slug}"] = ratio_to(samples, name, ours=OURS_COMPILED)
    block_rows = [[peer.name, *_row(name, block_samples[name], tokens=tokens, flops=moe_flops),
                   "" if name in _OURS else f"{ratio_to(block_samples, name):.2f}x"]
                  for name in block_samples]
    matched_rows = []
    titan = "torchtitan grouped_mm"
    if titan in block_samples:
        matched = ratio_to(block_samples, titan, ours=OURS_BF16)
        metrics[f"{key}_block_ours_bf16_vs_torchtitan_grouped_mm"] = matched
        ms = {name: _median([x.seconds for x in block_samples[name]]) * 1e3 for name in (OURS_BF16, titan)}
        matched_rows.append([peer.name, round(ms[OURS_BF16], 1), round(ms[titan], 1), f"{matched:.2f}x",
                             f"{ratio_to(block_samples, titan):.2f}x"])
    step_rows = [[peer.name, *_row(name, step_samples[name], tokens=tokens, flops=flops.total_flops),
                  "" if name in _OURS else f"{ratio_to(step_samples, name):.2f}x"] for name in step_samples]
    compiled_rows = []
    if OURS_COMPILED in step_samples:
        metrics[f"{key}_step_compiled_speedup"] = ratio_to(step_samples, "ours", ours=OURS_COMPILED)
        compiled_rows.append([
            peer.name, round(_median([x.seconds for x in step_samples["ours"]]) * 1e3, 1),
            round(_median([x.seconds for x in step_samples[OURS_COMPILED]]) * 1e3, 1),
            f"{metrics[f'{key}_step_compiled_speedup']:.2f}x",
            *(f"{ratio_to(step_samples, n, ours=OURS_COMPILED):.2f}x" if n in step_samples else "-"
              for n in ("transformers", "torchtitan grouped_mm", TITAN_COMPILED))])
    sync_row = [peer.name, syncs.total, ", ".join(f"{k} x{v}" for k, v in sorted(syncs.counts.items())) or "none",
                cfg.num_layers]
    return metrics, [block_rows, step_rows, [sync_row], bound_rows, matched_rows, compiled_rows]


def run(*, quick: bool = False, settings: PeersSettings | None = None) -> BenchResult:
    """Every config of ``settings`` (module doc)."""
    s = settings or PeersSettings.for_mode(quick=quick)
    start = time.perf_counter()
    torch.set_num_threads(1)
    return_freed_memory_to_os()
    tt, why = torchtitan_peer.load_torchtitan()
    metrics: dict[str, float | int | bool] = {"torchtitan_available": tt is not None}
    block_rows: list = []
    step_rows: list = []
    sync_rows: list = []
    bound_rows: list = []
    matched_rows: list = []
    compiled_rows: list = []
    for peer in s.configs:
        m, (b, st, sy, bo, ma, co) = run_config(peer, s, tt)
        metrics.update(m)
        block_rows += b
        step_rows += st
        sync_rows += sy
        bound_rows += bo
        matched_rows += ma
        compiled_rows += co
    columns = ["config", "implementation", "ms (median)", "tokens/s", "GFLOP/s", "peak above start MiB",
               "faulted in MiB", "kernel time share", "ours speed vs it"]
    tables = [
        Table(title="MoE block forward + backward, fp32 input, 1 thread", columns=columns, rows=block_rows),
        Table(title="Training step (forward, CE, backward, AdamW), fp32, 1 thread", columns=columns, rows=step_rows),
        Table(title="Host synchronisations in one forward + loss + backward of ours (Python-level calls)",
              columns=["config", "syncs per step", "calls", "MoE layers"], rows=sync_rows),
        Table(title="What bounds ours: GEMM share of the operator time and the ceiling with no non-GEMM work",
              columns=["config", "part", "ours GEMM share", "GEMM floor ms", "ceiling vs transformers",
                       "ceiling vs torchtitan grouped_mm"], rows=bound_rows),
    ]
    if matched_rows:
        tables.insert(1, Table(
            title="MoE block at matched precision: experts in bf16, router in fp32 (ours under bf16 autocast)",
            columns=["config", "ours bf16 autocast ms", "torchtitan grouped_mm ms", "ours speed vs it",
                     "ours fp32 speed vs it"], rows=matched_rows))
    if compiled_rows:
        tables.insert(2, Table(
            title="Training step with ours' dense blocks compiled (train.compile), the peers eager",
            columns=["config", "ours eager ms", "ours compiled ms", "compiled speedup", "ours compiled vs transformers",
                     "ours compiled vs torchtitan grouped_mm", "ours compiled vs torchtitan compiled"],
            rows=compiled_rows))
    notes = [
        f"preset {s.preset!r} (hidden 512, MLA q_lora 256 / kv_lora 128, heads 8) with expert FFN width "
        f"{s.expert_ffn_hidden_size} (~hidden/3), batch {s.batch_size} x {s.seq_len}; block rounds "
        f"{s.block_rounds}, step rounds {s.step_rounds}, after one warm-up call each, alternating.",
        "ours speed vs it = median over rounds of (its time / ours); > 1 means ours is faster.",
        "GFLOP/s: model FLOPs (longcat/model/flops.py at k_e = K*N/(N+Z)) over the median time; the block's "
        "FLOPs are the experts' and the router's GEMMs, forward + backward.",
        "step = forward, mean next-token CE, backward, AdamW; ours takes the CE fused with the LM head's GEMM "
        "(loss.lm_head_ce=fused, the training default: no [tokens, vocab] logits), the peers from their logits.",
        "transformers: LongcatFlashMoE / LongcatFlashForCausalLM with our weights (SDPA).",
        "torchtitan: MoE with N experts, top-k_e, softmax scores, no shared expert; DeepSeek-V3 with 2L layers "
        "(L dense with FFN width 2F, L MoE): the same MLA blocks, dense-FFN and expert FLOPs as ours. "
        "grouped_mm computes the experts in bf16 (torchtitan casts x and the weights); the fp32 loop is its "
        "only fp32 expert path (timed in the block up to "
        f"{s.torchtitan_loop_max_experts} experts: its backward zero-fills a full [N, F, D] gradient per expert and "
        "weight).",
        "GEMM floor = ours' median ms x the GEMM share of one profiled call (aten self times; the profiler "
        "inflates small operators, so the floor is, if anything, low); ceiling = the peer's median ms / that "
        "floor: the most ours could gain on it by removing every non-GEMM operator. Targets (issue): block >= 2x "
        "transformers and >= 1.1x torchtitan at top-12, step >= 1.15x transformers and >= 1.05x torchtitan.",
        "matched precision: ours under torch.autocast(bfloat16) (train.bf16) computes the experts in bf16 from "
        "fp32 weights and routes in fp32, as torchtitan's grouped_mm path does without autocast; ours speed vs "
        "it = median over rounds of (torchtitan grouped_mm time / ours bf16 time).",
        "ours compiled: the same weights with train.compile's torch.compile of the dense blocks (MLA, SwiGLU, "
        "RMSNorm; inductor, static shapes; the MoE eager); its warm-up call compiles and is not timed. "
        "transformers runs eager; torchtitan both eager and compiled as its apply_compile compiles (torch.compile "
        "of each transformer block, MoE included; not fullgraph: its CPU token-index path calls .item(), a graph "
        "break).",
        "faulted in: memory the call took fresh from the OS (minor page faults x page size; glibc's mmap "
        "threshold is fixed at 1 MiB here, so every larger tensor is fresh pages); kernel time share: system CPU "
        "time / wall time, mostly the kernel zero-filling those pages (one thread here; with more, every thread's "
        "system time adds up). Transparent huge pages fault 2 MiB at a time, so with THP on, faulted in "
        "under-reports.",
        "peak above start: the step's transient memory (activations, gradients, temporaries) beyond what "
        "was resident at its start (weights and optimizer state, held by all implementations alike); ours' "
        "includes its MoE workspace (longcat/model/moe/workspace.py: up to four reused CPU buffers per dtype, "
        "kept from call to call, so already resident at the start), all of it, every dtype, for each of ours' "
        "variants, which share it: if anything an overstatement.",
    ]
    if tt is not None:
        notes.append(f"torchtitan {tt.version} from {Path(tt.root).parent.name}/ (LONGCAT_TORCHTITAN_PATH).")
    else:
        notes.append(f"torchtitan skipped: {why}.")
    settings_out = {**dataclasses.asdict(s), "torchtitan_version": tt.version if tt is not None else None}
    return BenchResult(name="peers", title="LongCat-shaped MoE: ours vs transformers and torchtitan (DeepSeek-V3)",
                       metrics=metrics, tables=tables, settings=settings_out, notes=notes,
                       wall_s=time.perf_counter() - start)
