"""Test support shipped with the package: the multi-process gloo harness."""

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
