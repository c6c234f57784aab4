"""Test support shipped with the package: the multi-process gloo harness (``distributed``), and for the
reliability tests launchers (``jobs``), checkpoint-folder checks (``checkpoints``), fault injection
(``faults``) and its training entry point (``fault_train``, the only module here that imports the CLI)."""

from longcat.testing.distributed import (
    DistributedTestError,
    DistributedTimeoutError,
    distributed_test,
    find_free_port,
    run_distributed,
)

__all__ = [
    "DistributedTestError",
    "DistributedTimeoutError",
    "distributed_test",
    "find_free_port",
    "run_distributed",
]
