"""The benchmark suite (``tools/bench.py``, ``make bench``): see ``benchmarks/README.md``.

Modules: ``flops`` (the model-FLOP formula and GEMM shapes), ``matmul`` (measured matmul throughput),
``training`` (one training step of ours and of the transformers reference), ``child`` (a step in a
fresh process for peak RSS), the benchmarks ``throughput``, ``utilisation``, ``memory``, ``scaling``,
``checkpoint_save``, the registry ``suite`` and the markdown ``report``.
"""

from longcat.bench.common import BenchResult, Table, machine_info, write_result
from longcat.bench.report import write_report
from longcat.bench.suite import BENCHMARKS, run_suite, select
from longcat.model.flops import (
    Gemm,
    StepFlops,
    gemm_shapes,
    matmul_params_per_token,
    step_flops,
)

__all__ = [
    "BENCHMARKS",
    "BenchResult",
    "Gemm",
    "StepFlops",
    "Table",
    "gemm_shapes",
    "machine_info",
    "matmul_params_per_token",
    "run_suite",
    "select",
    "step_flops",
    "write_report",
    "write_result",
]
