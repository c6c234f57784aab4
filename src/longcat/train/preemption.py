"""Graceful stop on SIGTERM (or Ctrl-C / SIGINT): every rank checkpoints at the same step and exits 0,
within a deadline. A second Ctrl-C aborts at once (KeyboardInterrupt), without that checkpoint.

A cluster scheduler sends SIGTERM some time before it kills a job (SLURM: ``--signal=TERM@120``;
Kubernetes: ``terminationGracePeriodSeconds``; ``torchrun`` forwards it to its workers and sends SIGKILL
``--shutdown-timeout`` seconds, default 30, later). The signal may reach one rank or all of them, at
any moment. So:

1. the handler only records the request (a flag) and arms a deadline;
2. after every optimizer step all ranks all-reduce the flag (MAX over the world group), so they agree
   on the step at which to stop even when only one of them was signalled;
3. at that step they write a checkpoint (unless that step's was just written) and ``Trainer.fit``
   returns; the process exits 0 (exit 0 also keeps ``torchrun --max-restarts`` from restarting it);
4. if the checkpoint is not complete ``preempt_timeout_s`` after the signal (a hung collective, a
   slow file system), the process exits at once with ``EXIT_PREEMPT_TIMEOUT``; a save cut short this
   way leaves only a ``step_N.tmp/`` folder, which is never resumed from.

The deadline is armed from a helper thread woken through ``signal.set_wakeup_fd``: Python runs signal
handlers only in the main thread between bytecodes, so a main thread blocked inside a collective
would otherwise never see the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_PREEMPT_TIMEOUT = 128 + signal.SIGTERM  # 143, as if SIGTERM had killed the process
# what signal.signal takes and returns (typeshed's private signal._HANDLER)
_SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # SIGINT: Ctrl-C stops gracefully; a second Ctrl-C aborts


class PreemptionWatcher:
    """Turns SIGTERM into an agreed, checkpointed stop (see the module docstring).

    Use ``install()`` before the training loop (main thread only; elsewhere it does nothing),
    ``should_stop()`` once per step on every rank, ``mark_checkpointed()`` once the stop checkpoint is
    complete, ``uninstall()`` after the loop.

    Args:
        timeout_s: seconds from the signal to the forced exit.
        world_group: the group of all ranks (``ProcessGroups.world_group``); ``None`` for one process.
        rank: this process's rank in ``world_group`` (names it in the deadline message).
    """

    def __init__(self, *, timeout_s: float, world_group: Optional[dist.ProcessGroup] = None, rank: int = 0):
        self.timeout_s = timeout_s
        self.rank = rank
        self.world_group = world_group if dist.is_available() and dist.is_initialized() else None
        self._requested = threading.Event()
        self._interrupts = 0  # Ctrl-C presses seen by the handler
        self._checkpointed = False
        self._lock = threading.RLock()
        self._timer: Optional[threading.Timer] = None
        self._old_handlers: dict[int, _SignalHandler] = {}
        self._old_wakeup_fd: Optional[int] = None
        self._sockets: Optional[tuple[socket.socket, socket.socket]] = None

    # ------------------------------------------------------------------------- signal side
    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not the main thread: SIGTERM keeps its default action")
            return
        for signum in PREEMPT_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._handler)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._sockets = (reader, writer)
        self._old_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._read_wakeups, args=(reader,), name="preemption-watcher",
                         daemon=True).start()

    def uninstall(self) -> None:
        if self._sockets is None:
            return
        signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None else -1)
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        reader, writer = self._sockets
        writer.close()  # the reader sees EOF and its thread ends
        self._sockets = None
        if self._timer is not None and self._checkpointed:
            self._timer.cancel()

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # a second Ctrl-C: stop now, without the checkpoint
                raise KeyboardInterrupt
        self._request(signum)

    def _read_wakeups(self, reader: socket.socket) -> None:
        with reader:
            while True:
                try:
                    data = reader.recv(64)
                except OSError:
                    return
                if not data:
                    return
                for byte in data:
                    if byte in PREEMPT_SIGNALS:
                        self._request(byte)
                        break

    def _request(self, signum: int) -> None:
        with self._lock:
            if self._requested.is_set():
                return
            self._requested.set()
            logger.warning("received %s: checkpointing at the end of this step, then exiting (deadline %.0f s)",
                           signal.Signals(signum).name, self.timeout_s)
            self._timer = threading.Timer(self.timeout_s, self._deadline)
            self._timer.daemon = True
            self._timer.start()

    def _deadline(self) -> None:
        if self._checkpointed:
            code, why = 0, "the stop checkpoint is complete but the process had not exited"
        else:
            code, why = EXIT_PREEMPT_TIMEOUT, "no complete checkpoint was written in time (the last complete one stays)"
        print(f"[rank{self.rank}] preemption deadline of {self.timeout_s:.0f} s passed: {why}; exiting with {code}",
              file=sys.stderr, flush=True)
        os._exit(code)

    # ------------------------------------------------------------------------- training-loop side
    @property
    def requested(self) -> bool:
        """Whether this rank was signalled (not yet agreed with the others)."""
        return self._requested.is_set()

    def should_stop(self) -> bool:
        """Collective over the world group: True on every rank iff any rank was signalled."""
        flag = torch.tensor([1 if self._requested.is_set() else 0], dtype=torch.int32)
        if self.world_group is not None:
            # [1] int32 -> all_reduce(max, world) -> [1]
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world_group)
        return bool(flag.item())

    def mark_checkpointed(self) -> None:
        self._checkpointed = True
