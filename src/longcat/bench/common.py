"""Shared pieces of the benchmark suite: the machine description, result records, timing helpers.

Every benchmark returns a ``BenchResult``: flat numeric ``metrics`` (what the report's generic table
shows), ``tables`` (the benchmark's own markdown tables), the ``settings`` it ran with, free-text
``notes`` and the ``machine`` it ran on. ``write_result`` stores it as ``<output>/<name>.json``.

Units are suffixes of the metric names: ``_s``, ``_ms``, ``_mib``, ``tokens_per_s``, ``flop_per_s``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from longcat.config.compose import project_root
from longcat.config.schema import ModelConfig

RESULT_VERSION = 1


@dataclass
class Table:
    """A markdown table: ``rows`` are lists of cells (numbers or strings) matching ``columns``."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class BenchResult:
    """One benchmark's record, written as ``<name>.json``.

    name: file stem and ``--only`` name. title: the report heading. metrics: flat, numeric (or bool)
    headline figures. tables: detailed tables. settings: the knobs it ran with. notes: caveats.
    machine: ``machine_info()``. wall_s: the benchmark's own run time.
    """

    name: str
    title: str
    metrics: dict[str, float | int | bool]
    tables: list[Table] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    mode: str = ""  # "quick" or "full", set by the suite

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["version"] = RESULT_VERSION
        out["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return out


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, library versions, load at the time of the run."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu_model": cpu_model_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    try:
        import transformers

        info["transformers_version"] = transformers.__version__
    except ImportError:
        info["transformers_version"] = None
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def write_result(result: BenchResult, output_dir: Path) -> Path:
    """Write ``result`` as ``output_dir/<name>.json`` (machine filled in if empty). Returns the path."""
    if not result.machine:
        result.machine = machine_info()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{result.name}.json"
    path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return path


def load_preset(name: str, **overrides: Any) -> ModelConfig:
    """``conf/model/<name>.yaml`` as a validated ``ModelConfig`` (fields in ``overrides`` replaced).

    Raises:
        ValueError: no such preset.
    """
    from omegaconf import OmegaConf


    path = project_root() / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r} ({path}); choose one of {presets}")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)  # a structured config converts to its dataclass
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


@dataclass(frozen=True)
class Timing:
    """Wall and process-CPU seconds of one timed call (CPU time is less disturbed by other
    processes on a shared machine; with several threads it adds their times)."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    """Run ``fn()`` once; returns (its result, Timing)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    value = fn()
    return value, Timing(wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0)


def median(values: list[float]) -> float:
    """Median of a non-empty list (raises ValueError on an empty one)."""
    if not values:
        raise ValueError("median of no values: the benchmark measured nothing (steps/rounds must be >= 1)")
    return float(statistics.median(values))


def ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB. On Linux a process started by fork + exec inherits
    its parent's value when that is larger (the kernel keeps the replaced address space's high-water
    mark), so from a large parent it overstates a child's peak: see ``peak_rss_mib``."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024 if platform.system() != "Darwin" else maxrss / 2**20  # Linux: KiB, macOS: bytes


def peak_rss_mib() -> float:
    """Peak resident set size of this process's own address space, MiB: ``VmHWM`` of
    /proc/self/status (Linux), else ``ru_maxrss_mib()``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return ru_maxrss_mib()


@dataclass(frozen=True)
class KernelCost:
    """What the OS did for this process between two ``resource.getrusage`` snapshots: ``faulted_mib``, the
    memory it faulted in (minor page faults x the base page size; transparent huge pages fault 2 MiB at a
    time, so with THP this under-reports) and ``kernel_s``, its system CPU seconds (mostly zero-filling
    those pages; every thread's adds up)."""

    faulted_mib: float
    kernel_s: float

    @classmethod
    def between(cls, before: resource.struct_rusage, after: resource.struct_rusage) -> KernelCost:
        return cls(faulted_mib=(after.ru_minflt - before.ru_minflt) * resource.getpagesize() / 2**20,
                   kernel_s=after.ru_stime - before.ru_stime)


def current_rss_mib() -> float:
    """Current resident set size (Linux /proc/self/statm), MiB; 0.0 where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux; a no-op where not permitted)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def return_freed_memory_to_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB, so RSS tracks the live tensors: large tensors are mmapped
    and unmapped when freed (by default the threshold grows after such a free, later tensors come from
    the heap and freed memory stays resident, by an amount that differs from machine to machine).
    A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def rel_diff(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|, 1e-30)."""
    return abs(a - b) / max(abs(a), abs(b), 1e-30)
