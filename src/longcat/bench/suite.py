"""The benchmark suite: a registry of named benchmarks, run in order, each writing its JSON result."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from longcat.bench.common import BenchResult, machine_info, write_result
from longcat.bench.report import write_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    module: str  # imported lazily: ``run(*, quick) -> BenchResult``

    def runner(self) -> Callable[..., BenchResult]:
        import importlib

        return importlib.import_module(self.module).run


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("throughput", "training tokens/s, ours vs transformers, alternating, small preset fp32",
                  "longcat.bench.throughput"),
        Benchmark("peers", "LongCat-shaped MoE (64-128 experts, top-8/12): block and step vs transformers, torchtitan",
                  "longcat.bench.peers"),
        Benchmark("profile", "torch.profiler hot spots of a training step, ours vs transformers, grouped",
                  "longcat.bench.profile"),
        Benchmark("utilisation", "model FLOPs / step time over measured matmul throughput, fp32 and bf16",
                  "longcat.bench.utilisation"),
        Benchmark("memory", "peak RSS per process: ours, reference, activation checkpointing", "longcat.bench.memory"),
        Benchmark("scaling", "tokens/s and peak RSS as seq_len, experts and layers double", "longcat.bench.scaling"),
        Benchmark("checkpoint", "checkpoint save stall: synchronous vs async_save", "longcat.bench.checkpoint_save"),
        Benchmark("sdc", "SDC replay-check overhead at intervals 1/10/100 on the pretrain recipe; checksum cost",
                  "longcat.bench.sdc"),
        Benchmark("sdc_layouts", "SDC replay-check overhead (CPU time) under pp 2 and DeepSpeed ZeRO-2 dp 2, 2 procs",
                  "longcat.bench.sdc_layouts"),
        Benchmark("context_parallel", "cp MLA: latent vs K/V exchange bytes (analytic); cp=1 vs cp=2 step, 2 procs",
                  "longcat.bench.context_parallel"),
        Benchmark("dispatchers", "EP token dispatchers: all-to-all vs all-gather bytes and step, ep=2/4, top-k 4/8/12",
                  "longcat.bench.dispatchers"),
    )
}


def select(only: str | None) -> list[Benchmark]:
    """Benchmarks named in the comma-separated ``only`` (all when None/empty), in suite order.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if not only:
        return list(BENCHMARKS.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return [b for name, b in BENCHMARKS.items() if name in names]


def run_suite(benchmarks: list[Benchmark], *, quick: bool, output_dir: Path, docs_path: Path | None,
              on_result: Callable[[BenchResult, Path], None] | None = None) -> list[Path]:
    """Run ``benchmarks`` in order, writing ``output_dir/<name>.json`` after each (so a later failure
    keeps the earlier results), then regenerate ``docs_path`` from every JSON file in ``output_dir``.
    A failing benchmark is logged and the rest still run; raises RuntimeError at the end if any failed."""
    paths, failed = [], []
    for bench in benchmarks:
        logger.info("running %s (%s)%s", bench.name, bench.summary, " [quick]" if quick else "")
        start, machine = time.perf_counter(), machine_info()  # the load average as the run starts
        try:
            result = bench.runner()(quick=quick)
        except Exception:  # keep going: one broken benchmark should not lose the others
            logger.exception("benchmark %s failed", bench.name)
            failed.append(bench.name)
            continue
        result.mode = "quick" if quick else "full"
        result.machine = result.machine or machine
        result.wall_s = result.wall_s or time.perf_counter() - start
        path = write_result(result, output_dir)
        paths.append(path)
        if on_result is not None:
            on_result(result, path)
    if docs_path is not None:
        write_report(output_dir, docs_path)
    if failed:
        raise RuntimeError(f"benchmark(s) failed: {failed} (see the log above)")
    return paths
