"""Training runs as a cluster sees them: launch, find workers by rank, kill them, wait, read the logs.

The reliability tests (docs/reliability.md) SIGKILL or SIGTERM whole training runs and relaunch them.
Two launchers share one interface:

- ``TorchrunJob``: ``torchrun --standalone -m longcat.train`` (real agent: ``--max-restarts``, SIGTERM
  forwarding). Workers are the agent's children, told apart by ``RANK`` in their environment.
- ``ForkedJob``: the same CLI on N processes forked from a server that has already imported torch and
  longcat, rendezvousing over ``env://`` as torchrun's workers do. A launch costs a fork instead of
  three torch imports, which is what lets a test relaunch a run a dozen times on two cores. When a
  worker dies, the job stops the others as torchrun does: SIGTERM, then SIGKILL after
  ``shutdown_timeout_s``.

Both take ``faults=FaultPlan(...)`` (``longcat.testing.faults``): the workers then run
``longcat.testing.fault_train``, the CLI with those faults installed as a callback. Forked workers
always enter through it (with no faults it is the plain CLI); torchrun runs ``-m longcat.train``
unless there are faults.

Example::

    job = ForkedJob.launch(overrides, log_dir=tmp / "launch0", nproc=2)
    job.wait_for_workers()
    job.kill_workers([1])          # SIGKILL
    rc = job.wait(timeout_s=60)    # non-zero: a worker died
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import psutil

from longcat.testing.distributed import find_free_port
from longcat.testing.faults import FaultPlan

__all__ = ["ForkedJob", "TorchrunJob", "run_cli", "worker_env"]

_PRELOAD = ["torch", "torch.distributed.checkpoint", "hydra", "longcat.config.compose",
            "longcat.testing.fault_train", "longcat.launch", "longcat.train.trainer"]
_CONTEXT: Optional[mp.context.ForkServerContext] = None


def worker_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of a test launch: one intra-op thread (two shared cores), no wandb, then ``extra``."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


class _Job:
    """What both launchers share: workers by rank, signals, logs."""

    nproc: int

    def workers(self) -> dict[int, psutil.Process]:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def wait_for_workers(self, timeout_s: float = 60.0) -> dict[int, psutil.Process]:
        """rank -> process, once all ``nproc`` workers run; raises if the job ends first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.workers()
            if len(found) == self.nproc:
                return found
            if not self.running():
                raise RuntimeError("the job ended before all its workers started:\n" + self.log()[-3000:])
            time.sleep(0.02)
        raise TimeoutError(f"{self.nproc} workers did not start within {timeout_s} s")

    def signal_worker(self, rank: int, signum: int) -> None:
        self.wait_for_workers()[rank].send_signal(signum)

    def kill_workers(self, ranks: Sequence[int]) -> None:
        """SIGKILL workers ``ranks`` together (after all of them exist)."""
        workers = self.wait_for_workers()
        for rank in ranks:
            workers[rank].kill()

    def log(self) -> str:
        raise NotImplementedError


class TorchrunJob(_Job):
    """``torchrun --standalone --nproc-per-node N [--max-restarts R] -m longcat.train OVERRIDES``
    (``-m longcat.testing.fault_train FAULT_OPTIONS OVERRIDES`` with ``faults``)."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, nproc: int):
        self.proc, self.log_path, self.nproc = proc, Path(log_path), nproc
        self._seen: dict[int, psutil.Process] = {}

    @classmethod
    def launch(cls, overrides: Sequence[str], *, log_path: Path, nproc: int = 2, max_restarts: int = 0,
               env: Optional[Mapping[str, str]] = None, torchrun_args: Sequence[str] = (),
               faults: Optional[FaultPlan] = None, launcher: Optional[Sequence[str]] = None) -> TorchrunJob:
        """``launcher``: the command before torchrun's arguments (default: this interpreter's
        ``torchrun``; e.g. ``[sys.executable, "-m", "longcat.torchrun"]``)."""
        torchrun = list(launcher) if launcher else [str(Path(sys.executable).with_name("torchrun"))]
        entry = ["longcat.testing.fault_train", *faults.to_args()] if faults else ["longcat.train"]
        cmd = [*torchrun, "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               "--monitor-interval=0.1", *torchrun_args, "-m", *entry, *overrides]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env(env),
                                    start_new_session=True)
        return cls(proc, log_path, nproc)

    def running(self) -> bool:
        return self.proc.poll() is None

    def workers(self) -> dict[int, psutil.Process]:
        """rank -> live worker of the current restart generation."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return {}
        found = {}
        for child in children:
            try:
                rank = child.environ().get("RANK")
                alive = child.status() != psutil.STATUS_ZOMBIE
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if rank is not None and alive:
                found[int(rank)] = child
        self._seen.update({child.pid: child for child in found.values()})
        return found

    def signal_launcher(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """torchrun's exit code; on timeout every process of the job is killed and TimeoutError raised."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise TimeoutError(f"the job did not exit within {timeout_s} s:\n" + self.log()[-3000:]) from None

    def kill_all(self) -> None:
        """SIGKILL the agent and every worker it started (idempotent)."""
        self.workers()
        for process in self._seen.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _context() -> mp.context.ForkServerContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


def _run_cli(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """A forked worker: point stdout/stderr at ``log_path``, take ``env``, run the CLI (through
    ``fault_train``: ``argv`` may start with fault options), exit with its code."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    import torch

    from longcat.testing.fault_train import main

    torch.set_num_threads(1)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedJob(_Job):
    """``python -m longcat.train OVERRIDES`` on ``nproc`` ranks forked from a preloaded server (see above),
    with ``faults`` installed when given."""

    def __init__(self, processes: list, log_dir: Path, shutdown_timeout_s: float, failure_grace_s: float):
        self.processes, self.log_dir, self.nproc = processes, Path(log_dir), len(processes)
        self.shutdown_timeout_s, self.failure_grace_s = shutdown_timeout_s, failure_grace_s
        self.exit_codes: list[Optional[int]] = [None] * len(processes)

    @classmethod
    def launch(cls, overrides: Sequence[str], *, log_dir: Path, nproc: int = 2,
               env: Optional[Mapping[str, str]] = None, shutdown_timeout_s: float = 3.0,
               failure_grace_s: float = 1.0, faults: Optional[FaultPlan] = None) -> ForkedJob:
        log_dir = Path(log_dir)
        argv = [*(faults.to_args() if faults else ()), *overrides]
        log_dir.mkdir(parents=True, exist_ok=True)
        port = find_free_port()
        processes = []
        for rank in range(nproc):
            rank_env = worker_env({**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            process = _context().Process(target=_run_cli, args=(argv, rank_env,
                                                                str(log_dir / f"rank{rank}.log")), daemon=False)
            process.start()
            processes.append(process)
        return cls(processes, log_dir, shutdown_timeout_s, failure_grace_s)

    def running(self) -> bool:
        return any(p.is_alive() for p in self.processes)

    def workers(self) -> dict[int, psutil.Process]:
        found = {}
        for rank, process in enumerate(self.processes):
            if process.is_alive():
                try:
                    found[rank] = psutil.Process(process.pid)
                except psutil.NoSuchProcess:
                    pass
        return found

    def wait(self, timeout_s: float) -> int:
        """0 if every rank exited 0, else the first failure's code (negative: killed by that signal).

        Once a rank fails the others get ``failure_grace_s`` to exit by themselves, then SIGTERM, then
        SIGKILL ``shutdown_timeout_s`` later (as torchrun). ``exit_codes`` holds every rank's code.
        """
        deadline = time.monotonic() + timeout_s
        first_failure: Optional[int] = None
        while any(p.exitcode is None for p in self.processes):
            if first_failure is None:
                first_failure = next((p.exitcode for p in self.processes if p.exitcode not in (None, 0)), None)
                if first_failure is not None:
                    self._stop_survivors()
                    break
            if time.monotonic() > deadline:
                self.kill_all()
                raise TimeoutError(f"the job did not exit within {timeout_s} s:\n" + self.log()[-3000:])
            time.sleep(0.02)
        for process in self.processes:
            process.join()
        self.exit_codes = [p.exitcode for p in self.processes]
        if first_failure is None:
            # every code is set once joined
            first_failure = next((c for c in self.exit_codes if c is not None and c != 0), 0)
        return first_failure

    def _stop_survivors(self) -> None:
        grace_end = time.monotonic() + self.failure_grace_s
        for process in self.processes:
            process.join(max(0.0, grace_end - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        self.kill_all()

    def kill_all(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("rank*.log")))


def run_cli(overrides: Sequence[str], *, log_dir: Path, nproc: int = 1, env: Optional[Mapping[str, str]] = None,
            timeout_s: float = 180.0, faults: Optional[FaultPlan] = None) -> tuple[int, str]:
    """Run ``python -m longcat.train OVERRIDES`` on ``nproc`` forked ranks to the end: (exit code, log)."""
    job = ForkedJob.launch(overrides, log_dir=log_dir, nproc=nproc, env=env, faults=faults)
    try:
        return job.wait(timeout_s=timeout_s), job.log()
    finally:
        job.kill_all()
