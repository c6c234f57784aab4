"""The benchmark suite: a registry of named benchmarks, run in order, each writing its JSON result."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from longcat.bench.common import BenchResult, Table, machine_info, write_result
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


def run_one(bench: Benchmark, *, quick: bool, output_dir: Path, threads: int = 0) -> Path:
    """Run ``bench`` in this process and write ``output_dir/<name>.json``; ``threads`` > 0 sets torch's
    intra-op threads first. Returns the path."""
    if threads:
        torch.set_num_threads(threads)
    start, machine = time.perf_counter(), machine_info()  # the load average as the run starts
    result = bench.runner()(quick=quick)
    result.mode = "quick" if quick else "full"
    result.machine = result.machine or machine
    result.wall_s = result.wall_s or time.perf_counter() - start
    return write_result(result, output_dir)


def _load_result(path: Path) -> BenchResult:
    data = json.loads(path.read_text())
    tables = [Table(title=t["title"], columns=t["columns"], rows=t["rows"]) for t in data["tables"]]
    return BenchResult(name=data["name"], title=data["title"], metrics=data["metrics"], tables=tables,
                       settings=data["settings"], notes=data["notes"], machine=data["machine"], wall_s=data["wall_s"],
                       mode=data["mode"])


def run_suite(benchmarks: list[Benchmark], *, quick: bool, output_dir: Path, docs_path: Path | None,
              on_result: Callable[[BenchResult, Path], None] | None = None, threads: int = 0) -> list[Path]:
    """Run ``benchmarks`` in order, each in a process of its own (``python -m longcat.bench.run_one``), so
    that what one sets for its whole process (torch's thread count, glibc's mmap threshold, compiled
    graphs, deterministic flags) never reaches the next and a result does not depend on which ran
    before it. Each writes ``output_dir/<name>.json`` (so a later failure keeps the earlier results);
    then ``docs_path`` is regenerated from every JSON file in ``output_dir``. A failing benchmark is
    logged and the rest still run; raises RuntimeError at the end if any failed."""
    paths, failed = [], []
    for bench in benchmarks:
        logger.info("running %s (%s)%s", bench.name, bench.summary, " [quick]" if quick else "")
        cmd = [sys.executable, "-m", "longcat.bench.run_one", bench.name, "--module", bench.module,
               "--summary", bench.summary, "--output", str(output_dir), "--threads", str(threads)] \
            + (["--quick"] if quick else [])
        code = subprocess.call(cmd)
        if code != 0:  # keep going: one broken benchmark should not lose the others
            logger.error("benchmark %s failed (exit code %d; its error is above)", bench.name, code)
            failed.append(bench.name)
            continue
        path = Path(output_dir) / f"{bench.name}.json"
        paths.append(path)
        if on_result is not None:
            on_result(_load_result(path), path)
    if docs_path is not None:
        write_report(output_dir, docs_path)
    if failed:
        raise RuntimeError(f"benchmark(s) failed: {failed} (see the log above)")
    return paths
