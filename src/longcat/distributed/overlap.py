"""Where asynchronous collectives run, and how long their waits block (docs/architecture.md, the ScMoE
overlap).

One code path serves CPU and GPU:

- CPU (gloo): the collective runs on gloo's own threads; ``wait()`` blocks the host until it is done.
- GPU (NCCL): the collective is launched from a dedicated side stream per device, the *comm stream*.
  At launch the comm stream waits for the compute stream (the inputs are ready) and every tensor the
  collective touches is ``record_stream``-ed on it, so the caching allocator cannot hand its memory
  to the compute stream while the exchange still reads or writes it. At ``wait()`` the comm stream
  waits for the collective (``Work.wait`` under the comm stream) and the compute stream then waits
  for the comm stream (an event): the host is not blocked, later compute kernels are.

``InFlight`` is one launched collective; ``launch`` starts one. ``CommWaitRecorder`` collects, per
label (``comm_label("dispatch")``), the time the consumer was held up in ``wait()``: host time blocked
on CPU; on GPU the compute stream's stall, from two CUDA events (the compute stream reaching the wait,
the comm stream finishing), resolved when ``totals()`` is read. The label and recorder active at
launch are kept with the collective, so a wait that happens later, in another thread (the autograd
engine's), is still booked to them.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "CommWaitRecorder",
    "CommWaitTotals",
    "InFlight",
    "comm_label",
    "comm_stream",
    "current_comm_label",
    "current_recorder",
    "launch",
    "record_comm_waits",
]

_RECORDER: contextvars.ContextVar[Optional[CommWaitRecorder]] = contextvars.ContextVar("comm_recorder", default=None)
_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("comm_label", default="comm")
_COMM_STREAMS: dict[int, torch.cuda.Stream] = {}


@dataclass
class CommWaitTotals:
    """blocked_s: seconds the consumer waited in ``wait()`` (summed); num_waits: waits counted."""

    blocked_s: float = 0.0
    num_waits: int = 0


class CommWaitRecorder:
    """Time blocked in the waits of asynchronous collectives, by key ``"<label>.<forward|backward>"``.

    Activate with ``record_comm_waits(recorder)`` around the forward (the recorder is captured at
    launch, so the backward's waits are booked to it too). Instrumentation only: recording adds two
    CUDA events per wait on GPU and nothing that changes the numbers.
    """

    def __init__(self) -> None:
        self._totals: dict[str, CommWaitTotals] = defaultdict(CommWaitTotals)
        self._pending_events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def add_host(self, key: str, seconds: float) -> None:
        entry = self._totals[key]
        entry.blocked_s += seconds
        entry.num_waits += 1

    def add_cuda(self, key: str, reached: torch.cuda.Event, done: torch.cuda.Event) -> None:
        self._pending_events.append((key, reached, done))

    def totals(self) -> dict[str, CommWaitTotals]:
        """Per key totals so far (synchronises the recorded CUDA events first, if any)."""
        for key, reached, done in self._pending_events:
            done.synchronize()
            # Events on different streams share the device clock: a positive gap is a compute stall.
            self.add_host(key, max(0.0, reached.elapsed_time(done)) / 1e3)
        self._pending_events.clear()
        return {key: CommWaitTotals(v.blocked_s, v.num_waits) for key, v in self._totals.items()}

    def reset(self) -> None:
        self._totals.clear()
        self._pending_events.clear()


@contextlib.contextmanager
def record_comm_waits(recorder: CommWaitRecorder) -> Iterator[CommWaitRecorder]:
    """Book the waits of collectives launched inside the block (and of their backward) to ``recorder``."""
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


@contextlib.contextmanager
def comm_label(label: str) -> Iterator[None]:
    """Name the collectives launched inside the block (e.g. ``"dispatch"``, ``"combine"``)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def current_recorder() -> Optional[CommWaitRecorder]:
    return _RECORDER.get()


def current_comm_label() -> str:
    return _LABEL.get()


def comm_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    """The side stream that carries this process's collectives on a CUDA ``device``; None on CPU
    (gloo's threads carry them there). One stream per device, created on first use."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COMM_STREAMS:
        _COMM_STREAMS[index] = torch.cuda.Stream(device=index)
    return _COMM_STREAMS[index]


class InFlight:
    """A launched collective. ``wait()`` returns ``output`` once the consumer may read it (host blocked
    on CPU; compute stream ordered after it on GPU). The tensors in ``keepalive`` (the send buffer)
    are held until then. Waiting twice is a no-op."""

    def __init__(
        self,
        output: torch.Tensor,
        work: Optional[dist.Work],
        *,
        keepalive: Sequence[torch.Tensor],
        stream: Optional[torch.cuda.Stream],
        key: str,
        recorder: Optional[CommWaitRecorder],
    ) -> None:
        self.output = output
        self._work = work
        self._keepalive = tuple(keepalive)
        self._stream = stream
        self.key = key
        self._recorder = recorder

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        work, self._work = self._work, None
        if work is None:
            return self.output
        if self._stream is None:
            start = time.perf_counter()
            work.wait()
            if self._recorder is not None:
                self._recorder.add_host(self.key, time.perf_counter() - start)
        else:
            compute = torch.cuda.current_stream(self.output.device)
            timing = None  # (recorder, reached, done) when recorded
            if self._recorder is not None:
                timing = (self._recorder, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                compute.record_event(timing[1])
            with torch.cuda.stream(self._stream):
                work.wait()  # the comm stream waits for the collective
            if timing is not None:
                recorder, reached, done = timing
                self._stream.record_event(done)
                recorder.add_cuda(self.key, reached, done)
            compute.wait_stream(self._stream)
        self._keepalive = ()
        return self.output


def launch(
    collective: Callable[[], Optional[dist.Work]],
    *,
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    key: str,
    recorder: Optional[CommWaitRecorder],
) -> InFlight:
    """Run ``collective()`` on the comm stream and return the ``InFlight`` for it.

    ``collective`` must start an ``async_op=True`` collective that reads ``inputs`` and writes
    ``output`` (all on the same device) and return its Work. ``key`` names its wait for ``recorder``
    (None: not recorded); take both from ``current_comm_label()`` / ``current_recorder()`` when the
    forward launches, and reuse the forward's for a backward launch.
    """
    stream = comm_stream(output.device)
    if stream is None:
        work = collective()
    else:
        stream.wait_stream(torch.cuda.current_stream(output.device))  # the inputs are ready
        with torch.cuda.stream(stream):
            work = collective()
        for tensor in (output, *inputs):
            tensor.record_stream(stream)
    return InFlight(output, work, keepalive=inputs, stream=stream, key=key, recorder=recorder)
