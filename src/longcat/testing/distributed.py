"""A multi-process gloo harness for distributed tests, shipped inside the package.

``run_distributed(fn, world_size=N)`` starts N fresh processes (``spawn``), initialises a gloo
process group in each (``env://`` on 127.0.0.1 and a free port), calls ``fn(*args)`` on every rank
and returns the per-rank results. The caller fails, with that rank's traceback, within about two
seconds of any rank raising or dying (the earliest failure is reported as the cause, later ones,
typically peers' "connection reset" errors, are summarised); a run that outlives ``timeout_s``
(a deadlock, a rank waiting on a collective its peers never enter) has every rank killed and
raises :class:`DistributedTimeoutError`. Ranks are
killed, not asked to exit, because a rank blocked inside a gloo collective cannot see a Python
signal until the collective returns.

Modelled on OLMo-core's ``olmo_core.testing.distributed``. Inside ``fn`` use
``torch.distributed.get_rank()`` and build groups from ``ParallelDims`` as production code does;
the harness adds no globals of its own.

Example::

    def _body(scale):
        rank = dist.get_rank()
        return rank * scale

    assert run_distributed(_body, world_size=2, args=(10,)) == [0, 10]

``fn``, ``args`` and the results cross process boundaries by pickle: ``fn`` must be a module-level
function (or another picklable callable) and results must be picklable (tensors are fine).
"""

from __future__ import annotations

import datetime
import functools
import importlib
import inspect
import io
import os
import pickle
import queue as queue_lib
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "DistributedTestError",
    "DistributedTimeoutError",
    "distributed_test",
    "find_free_port",
    "run_distributed",
]

_MSG_RESULT = "result"
_MSG_ERROR = "error"
_POLL_S = 0.05
_GLOO_TIMEOUT_MARGIN_S = 60.0
_FAILURE_GRACE_S = 2.0
_SILENT_DEATH_S = 0.5


class DistributedTestError(RuntimeError):
    """A rank raised or died; ``rank`` and its ``rank_traceback`` (text) say which and where."""

    def __init__(self, rank: int, rank_traceback: str):
        self.rank = rank
        self.rank_traceback = rank_traceback
        super().__init__(f"rank {rank} failed:\n{rank_traceback}")


class DistributedTimeoutError(TimeoutError):
    """The run outlived its timeout; every rank was killed. ``pending_ranks`` had not finished."""

    def __init__(self, timeout_s: float, pending_ranks: Sequence[int]):
        self.timeout_s = timeout_s
        self.pending_ranks = tuple(pending_ranks)
        super().__init__(
            f"distributed run exceeded timeout_s={timeout_s}; ranks {list(self.pending_ranks)} had not "
            "finished (a deadlock, or a collective some rank never entered) and all ranks were killed. "
            "Raise timeout_s if the work is just slow."
        )


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it by binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _RankPrefixedStream(io.TextIOBase):
    """Writes ``[rank N] `` before every line so interleaved rank output stays attributable."""

    def __init__(self, stream: Any, prefix: str):
        self._stream = stream
        self._prefix = prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for line in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._prefix)
            out.append(line)
            self._at_line_start = line.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return False


@dataclass(frozen=True)
class _WorkerSpec:
    world_size: int
    master_port: int
    timeout_s: float
    env: Mapping[str, str]
    num_threads: int


def _worker(rank: int, spec: _WorkerSpec, fn: Callable[..., Any], args: tuple, out_queue: Any) -> None:
    """Entry point of one spawned rank: set up env and gloo, run ``fn``, report result or error."""
    sys.stdout = _RankPrefixedStream(sys.stdout, f"[rank {rank}] ")
    sys.stderr = _RankPrefixedStream(sys.stderr, f"[rank {rank}] ")
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(spec.master_port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(spec.world_size),
            "LOCAL_WORLD_SIZE": str(spec.world_size),
        }
    )
    os.environ.update(spec.env)
    torch.set_num_threads(spec.num_threads)
    message: tuple[int, str, bytes | str, float]  # (rank, kind, pickled result | traceback, time)
    try:
        dist.init_process_group(
            backend="gloo",
            init_method="env://",
            rank=rank,
            world_size=spec.world_size,
            # Longer than the run's timeout, so the parent's deadline (which kills every rank and
            # reports a timeout) comes first; still bounds orphaned ranks if the parent is gone.
            timeout=datetime.timedelta(seconds=spec.timeout_s + _GLOO_TIMEOUT_MARGIN_S),
        )
        # The timestamp is taken before destroy_process_group: tearing down this rank's
        # connections makes its peers fail, and those consequences must sort after the cause.
        message = (rank, _MSG_RESULT, pickle.dumps(fn(*args)), time.time())  # tensors by value
        # No rank tears down while a peer may still be finishing its last collective with it.
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report anything, including KeyboardInterrupt/SystemExit
        message = (rank, _MSG_ERROR, traceback.format_exc(), time.time())
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        out_queue.put(message)
        sys.stdout.flush()
        sys.stderr.flush()


def _kill_all(procs: Sequence[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=10)


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    env: Optional[Mapping[str, str]] = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks and return their results by rank.

    Args:
        fn: picklable callable (a module-level function); runs after ``init_process_group("gloo")``
            with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK set in the environment.
        world_size: number of processes, >= 1.
        args: picklable positional arguments, identical on every rank.
        timeout_s: wall-clock limit for the whole run including process start-up (each spawned
            interpreter imports torch, about 1-2 s). Gloo's own timeout is set 60 s longer.
        env: extra environment variables set in each rank before the process group starts.

    Returns:
        ``[result_rank0, result_rank1, ...]``, each what ``fn`` returned on that rank.

    Raises:
        DistributedTestError: a rank raised (its traceback is in the message) or exited without
            reporting; the other ranks are killed within ``_FAILURE_GRACE_S`` (2 s), even if
            blocked in a collective.
        DistributedTimeoutError: the run did not finish within ``timeout_s``; all ranks killed.
        ValueError: world_size < 1 or timeout_s <= 0.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    spec = _WorkerSpec(
        world_size=world_size,
        master_port=find_free_port(),
        timeout_s=timeout_s,
        env=dict(env or {}),
        num_threads=max(1, (os.cpu_count() or 1) // world_size),
    )
    ctx = mp.get_context("spawn")
    out_queue = ctx.Queue()
    # Not daemonic: a rank may start its own workers (e.g. DataLoader num_workers > 0).
    procs = [
        ctx.Process(target=_worker, args=(rank, spec, fn, args, out_queue), name=f"rank{rank}")
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
        monitor = _Monitor(procs, out_queue, deadline=time.monotonic() + timeout_s)
        monitor.run()
    finally:
        _kill_all(procs)
        out_queue.close()
    if monitor.failures:
        raise monitor.root_cause()
    if len(monitor.results) < world_size:
        raise DistributedTimeoutError(timeout_s, [r for r in range(world_size) if r not in monitor.results])
    return [monitor.results[rank] for rank in range(world_size)]


@dataclass(frozen=True)
class _Failure:
    rank: int
    text: str
    time_s: float  # time.time() of the failure; orders root cause before its consequences
    silent: bool  # exited without a report: a crash, the likeliest root cause


class _Monitor:
    """Collects every rank's report until all are in, the deadline passes, or a failure settles.

    When one rank fails, its peers usually fail a moment later with "connection reset" from a
    collective; the monitor keeps listening for ``_FAILURE_GRACE_S`` so that it can report the
    earliest failure (the cause) rather than whichever report arrived first.
    """

    def __init__(self, procs: Sequence[Any], out_queue: Any, *, deadline: float):
        self.procs, self.out_queue, self.deadline = procs, out_queue, deadline
        self.results: dict[int, Any] = {}
        self.failures: dict[int, _Failure] = {}
        self._dead_since: dict[int, float] = {}

    def _pending(self) -> list[int]:
        return [r for r in range(len(self.procs)) if r not in self.results and r not in self.failures]

    def run(self) -> None:
        settle_by = None
        while self._pending():
            now = time.monotonic()
            if now > self.deadline or (settle_by is not None and now > settle_by):
                return
            try:
                rank, kind, payload, time_s = self.out_queue.get(timeout=_POLL_S)
            except queue_lib.Empty:
                self._note_silent_deaths()
            else:
                if kind == _MSG_ERROR:
                    self.failures[rank] = _Failure(rank, payload, time_s, silent=False)
                else:
                    self.results[rank] = pickle.loads(payload)
            if self.failures and settle_by is None:
                settle_by = time.monotonic() + _FAILURE_GRACE_S

    def _note_silent_deaths(self) -> None:
        for rank in self._pending():
            proc = self.procs[rank]
            if proc.is_alive() or proc.exitcode is None:
                continue
            # Its report may still be in the pipe behind the exit: only a lasting silence counts.
            first_seen = self._dead_since.setdefault(rank, time.monotonic())
            if time.monotonic() - first_seen > _SILENT_DEATH_S:
                text = f"process exited with code {proc.exitcode} without reporting a result or an error"
                self.failures[rank] = _Failure(rank, text, time.time() - _SILENT_DEATH_S, silent=True)

    def root_cause(self) -> DistributedTestError:
        cause = min(self.failures.values(), key=lambda f: (not f.silent, f.time_s))
        others = [f for f in self.failures.values() if f is not cause]
        text = cause.text
        if others:
            summary = "\n".join(f"  rank {f.rank}: {f.text.strip().splitlines()[-1]}" for f in others)
            text += f"\n(later failures, probably consequences:)\n{summary}\n"
        return DistributedTestError(cause.rank, text)


class _ImportedFunction:
    """A picklable reference to the undecorated body of a ``@distributed_test`` function."""

    def __init__(self, module: str, qualname: str):
        self.module = module
        self.qualname = qualname

    def __call__(self, *args: Any) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj.__wrapped__(*args)


def distributed_test(
    *, world_size: int, timeout_s: float = 60.0, env: Optional[Mapping[str, str]] = None
) -> Callable[[Callable[..., Any]], Callable[..., None]]:
    """Decorator: the test body runs on ``world_size`` gloo ranks via :func:`run_distributed`.

    The decorated function (module-level) keeps its pytest-visible signature; pytest parameters
    and fixture values are passed to every rank positionally in declaration order, so they must be
    picklable. The wrapper returns None (pytest warns about test return values); call
    :func:`run_distributed` directly to get per-rank results.

    Example::

        @distributed_test(world_size=2)
        def test_all_reduce():
            x = torch.ones(1)
            dist.all_reduce(x)
            assert x.item() == 2
    """

    def decorate(body: Callable[..., Any]) -> Callable[..., None]:
        target = _ImportedFunction(body.__module__, body.__qualname__)

        @functools.wraps(body)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            bound = inspect.signature(body).bind(*args, **kwargs)
            bound.apply_defaults()
            run_distributed(
                target, world_size=world_size, args=tuple(bound.arguments.values()), timeout_s=timeout_s, env=env
            )

        return wrapper

    return decorate
