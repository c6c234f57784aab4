"""Token dispatchers compared: bytes moved and step time of all-to-all vs all-gather (arXiv 2509.01322 §5.3).

The all-to-all dispatcher sends one copy of a token per FFN expert it chose (the local data grows with
top-k); the all-gather dispatcher sends every token with an FFN expert once to every ep rank, with its
ids and gates, and reduce-scatters the partial outputs back. At ep = 2 and 4 (one process per rank,
gloo), for top-k = 4, 8, 12, one ScMoE decoder layer runs forward + backward with the overlap schedule
on under each dispatcher, the two alternating in every round:

- bytes: what this rank sends to its peers in one step, rows (and the all-gather's ids and gates),
  dispatch + combine, forward + backward (the backward reverses each exchange with the same bytes),
  counted by the dispatcher (``DispatchCounters.peer_bytes_sent``), mean over the ranks;
- step time: the slowest rank's fastest round (``step_min_s``; other jobs only add time) and median.

The link: loopback with every all-to-all delayed to ``rate_mbit`` (``longcat.bench.overlap``'s stand-in
link: bytes to peers / rate, serial per rank, concurrent with compute), so that bytes cost time as on
a network; ``rate_mbit=0`` runs on bare loopback. Random router weights: about N / (N + Z) of the K
slots go to FFN experts.

Entry points: the suite (``tools/bench.py --only dispatchers``) and ``python -m
longcat.bench.dispatchers``; both write ``benchmarks/results/dispatchers.json`` (a ``BenchResult``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from longcat.bench.common import BenchResult, Table, write_result
from longcat.bench.overlap import _EmulatedLink
from longcat.config.schema import ModelConfig
from longcat.distributed import ParallelDims, ProcessGroups
from longcat.model import DecoderLayer, LongcatFlashForCausalLM
from longcat.model.moe.dispatch import AllGatherTokenDispatcher, AllToAllTokenDispatcher
from longcat.model.parallel.expert_parallel import apply_expert_parallel, apply_moe_overlap
from longcat.testing.distributed import run_distributed

DISPATCHERS = ("alltoall", "allgather")
MIB = 2**20


@dataclass(frozen=True)
class DispatcherBenchSettings:
    """The layer, batch, link and sweep (``--help``)."""

    hidden_size: int = 256
    num_attention_heads: int = 8
    ffn_hidden_size: int = 1024
    n_routed_experts: int = 16
    zero_expert_num: int = 8
    expert_ffn_hidden_size: int = 128
    topks: str = "4,8,12"
    ep_sizes: str = "2,4"
    batch_size: int = 2
    seq_len: int = 256
    rounds: int = 7
    warmup: int = 1
    threads: int = 1
    rate_mbit: float = 600.0  # the overlap benchmark's rate

    def model_config(self, topk: int) -> ModelConfig:
        head = self.hidden_size // self.num_attention_heads
        cfg = ModelConfig(
            vocab_size=256, hidden_size=self.hidden_size, num_layers=1, num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size, q_lora_rank=self.hidden_size // 2,
            kv_lora_rank=self.hidden_size // 4, qk_nope_head_dim=head, qk_rope_head_dim=head // 2, v_head_dim=head,
            n_routed_experts=self.n_routed_experts, zero_expert_num=self.zero_expert_num, moe_topk=topk,
            expert_ffn_hidden_size=self.expert_ffn_hidden_size,
        )
        cfg.validate()
        return cfg


QUICK = dict(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, expert_ffn_hidden_size=32, seq_len=32,
             rounds=2, warmup=1)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _rank_main(settings: DispatcherBenchSettings) -> dict[str, Any]:
    """One rank: every top-k, both dispatchers alternating per round. Returns per "topk.dispatcher"
    the step seconds per round and the bytes sent to peers per step."""
    torch.set_num_threads(settings.threads)
    world = int(os.environ["WORLD_SIZE"])  # run_distributed sets it, as torchrun does
    groups = ProcessGroups.build(ParallelDims(world, ep=world))
    if settings.rate_mbit > 0:
        _EmulatedLink(settings.rate_mbit).install()
    B, S, D = settings.batch_size, settings.seq_len, settings.hidden_size
    gen = torch.Generator().manual_seed(100 + groups.rank)
    h_BSD, g_BSD = torch.randn(B, S, D, generator=gen), torch.randn(B, S, D, generator=gen) / (B * S)
    out: dict[str, Any] = {}
    for topk in _ints(settings.topks):
        layers = {}
        dispatchers: dict[str, AllToAllTokenDispatcher | AllGatherTokenDispatcher] = {}
        for name in DISPATCHERS:
            torch.manual_seed(0)  # the same weights, so the same routing, under both dispatchers
            model = LongcatFlashForCausalLM(settings.model_config(topk))
            apply_expert_parallel(model, groups=groups, dispatcher=name)
            apply_moe_overlap(model, overlap=True)
            layer = model.model.layers[0]
            assert isinstance(layer, DecoderLayer)
            dispatcher = layer.mlp.dispatcher
            assert isinstance(dispatcher, (AllToAllTokenDispatcher, AllGatherTokenDispatcher))
            layers[name], dispatchers[name] = layer, dispatcher
        rope = model.model.rotary_emb(None, seq_len=S, device=h_BSD.device, dtype=h_BSD.dtype)
        times: dict[str, list[float]] = {name: [] for name in DISPATCHERS}
        for round_index in range(settings.warmup + settings.rounds):
            for name, layer in layers.items():
                if round_index == settings.warmup:
                    dispatchers[name].reset_counters()
                dist.barrier(group=groups.ep_group)
                start = time.perf_counter()
                h = h_BSD.detach().requires_grad_()
                layer(h, cos_BSP=rope[0], sin_BSP=rope[1])[0].backward(g_BSD)
                if round_index >= settings.warmup:
                    times[name].append(time.perf_counter() - start)
                layer.zero_grad(set_to_none=True)
        for name, dispatcher in dispatchers.items():
            counters = dispatcher.counters()
            out[f"{topk}.{name}"] = {
                "step_s": times[name],
                "peer_bytes_per_step": 2 * counters.peer_bytes_sent / max(counters.num_dispatches, 1),
                "rows_per_step": counters.dispatched_rows / max(counters.num_dispatches, 1),
                "zero_expert_rows_sent": counters.zero_expert_rows_sent,
            }
    return out


def summarise(per_ep: dict[int, list[dict[str, Any]]], settings: DispatcherBenchSettings) -> BenchResult:
    """The BenchResult of every ep size's ranks."""
    metrics: dict[str, float | int | bool] = {}
    rows = []
    for ep, ranks in per_ep.items():
        for topk in _ints(settings.topks):
            entry = {}
            for name in DISPATCHERS:
                key = f"{topk}.{name}"
                step_s = max(statistics.median(r[key]["step_s"]) for r in ranks)
                min_s = max(min(r[key]["step_s"]) for r in ranks)
                mib = statistics.mean(r[key]["peer_bytes_per_step"] for r in ranks) / MIB
                entry[name] = (min_s, mib)
                metrics[f"ep{ep}.topk{topk}.{name}.step_s"] = step_s
                metrics[f"ep{ep}.topk{topk}.{name}.step_min_s"] = min_s
                metrics[f"ep{ep}.topk{topk}.{name}.peer_mib_per_step"] = mib
                metrics[f"ep{ep}.topk{topk}.{name}.zero_expert_rows_sent"] = sum(
                    r[key]["zero_expert_rows_sent"] for r in ranks)
            (a2a_s, a2a_mib), (ag_s, ag_mib) = entry["alltoall"], entry["allgather"]
            metrics[f"ep{ep}.topk{topk}.allgather_over_alltoall_bytes"] = ag_mib / max(a2a_mib, 1e-12)
            metrics[f"ep{ep}.topk{topk}.allgather_over_alltoall_step"] = ag_s / max(a2a_s, 1e-12)
            rows.append([ep, topk, a2a_mib, ag_mib, ag_mib / max(a2a_mib, 1e-12), a2a_s * 1e3, ag_s * 1e3,
                         ag_s / max(a2a_s, 1e-12)])
    link = (f"loopback with every all-to-all delayed to {settings.rate_mbit} Mbit/s (stand-in link)"
            if settings.rate_mbit > 0 else "bare loopback (no link emulation)")
    notes = [
        f"link: {link}; gloo, one process per ep rank on this machine, {settings.threads} thread(s) each.",
        "bytes: sent by one rank to its peers per step (forward + backward; rows, plus 2K fp32 ids and gates per "
        "token for the all-gather), mean over ranks. step: one ScMoE decoder layer forward + backward, overlap "
        "on; the table gives the slowest rank's fastest round (other jobs on the machine only ever add time), "
        "the metrics also the median (step_s); the two dispatchers alternate within each round.",
        "Expected: all-to-all bytes grow with the FFN experts per token (K_e ~ K N/(N+Z)) times (ep-1)/ep, "
        "all-gather bytes with (ep-1) and not with K; the all-gather wins once K_e > ep (roughly).",
    ]
    return BenchResult(
        name="dispatchers",
        title="Token dispatchers: all-to-all vs all-gather, bytes and step time (ep=2, 4; top-k 4, 8, 12)",
        metrics=metrics,
        tables=[Table("Per rank and step", ["ep", "top-k", "all-to-all MiB", "all-gather MiB", "bytes ratio",
                                            "all-to-all min ms", "all-gather min ms", "step ratio"], rows)],
        settings=dataclasses.asdict(settings),
        notes=notes,
    )


def run_with(settings: DispatcherBenchSettings, *, timeout_s: float = 1800.0) -> BenchResult:
    started = time.monotonic()
    per_ep = {ep: run_distributed(_rank_main, world_size=ep, args=(settings,), timeout_s=timeout_s,
                                  env={"OMP_NUM_THREADS": str(settings.threads)})
              for ep in _ints(settings.ep_sizes)}
    result = summarise(per_ep, settings)
    result.wall_s = time.monotonic() - started
    return result


def run(*, quick: bool) -> BenchResult:
    """Suite entry (``tools/bench.py --only dispatchers``)."""
    return run_with(DispatcherBenchSettings(**(QUICK if quick else {})))  # type: ignore[arg-type]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(DispatcherBenchSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            help=f"default {field.default}")
    parser.add_argument("--quick", action="store_true", help=f"tiny settings (smoke test): {QUICK}")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(DispatcherBenchSettings)
                   if getattr(args, f.name) is not None})
    result = run_with(DispatcherBenchSettings(**values))
    result.mode = "quick" if args.quick else "full"
    path = write_result(result, args.output)
    print(json.dumps(result.metrics, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
