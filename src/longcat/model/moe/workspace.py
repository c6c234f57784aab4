"""A reused CPU workspace for the MoE's large temporaries (routed rows [R, D], expert activations [R, I]).

Without a caching allocator every large CPU tensor is fresh memory from the OS, and faulting it in (the
kernel zero-fills each page) costs about as much as writing it: in the MoE block at 64 + 32 experts,
top-12 (2048 tokens, 16k routed rows of 512 fp32 values, 32 MiB each) the block faulted in 407 MiB per
forward + backward and spent a quarter of its time in the kernel (``docs/benchmarks.md``, MoE block).
The gathers of the token dispatch, the SwiGLU of the experts and its gradients, and the experts' input
gradient take their temporaries from here (up to four buffers per dtype and thread: ``held_bytes``).
On CUDA the caching allocator already reuses blocks, so ``scratch`` is ``torch.empty`` there.
"""

from __future__ import annotations

import math
import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["held_bytes", "plain_eager", "scratch"]


class _Workspace(threading.local):
    """Per thread: dtype -> its slots, each [flat CPU buffer, its storage's use count when only this holds it]."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, list[tuple[torch.Tensor, int]]] = {}


_WORKSPACE = _Workspace()
_WORKSPACE_GROWTH = 1.125  # headroom over the request: R varies a little from step to step
# buffers per dtype and thread: the most temporaries alive at once (in SwiGLU's backward four: its incoming
# gradient, the down projection's input gradient; silu(gate), then grad * up; and its two gradients)
_WORKSPACE_SLOTS = 4


def _storage_use_count(t: torch.Tensor) -> int:
    # torch's own (private) count of the references to a storage; tests/unit/model/test_model_moe.py fails
    # if it stops seeing views and held tensors
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def plain_eager() -> bool:
    """Whether a workspace tensor made now is an ordinary one: not under ``torch.inference_mode`` (it
    would become an inference tensor, which a later training call may not write to) nor under a
    ``TorchDispatchMode`` such as ``FakeTensorMode`` (it would be a fake tensor)."""
    return not torch.is_inference_mode_enabled() and _get_current_dispatch_mode() is None


def scratch(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` to write a temporary into (``out=``).

    On the CPU it is a view of one of this thread's reused buffers (up to ``_WORKSPACE_SLOTS`` per
    dtype) that no tensor, view or saved tensor still holds (its storage's use count is the idle one):
    the smallest idle one that fits, else the largest idle one regrown to the request (12.5% headroom),
    else a new slot; with every slot busy, a new tensor. Buffers are kept for the next request
    (``held_bytes``). Elsewhere (CUDA: the caching allocator reuses blocks already) always a new
    tensor. The caller may return the result to autograd: while anything holds it, its slot is busy.
    Under ``torch.inference_mode`` or a dispatch mode (fake tensors, tracing) it is always a new
    tensor, and the workspace is left as it was.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0 or not plain_eager():
        return torch.empty(shape, dtype=dtype, device=device)
    slots = _WORKSPACE.buffers.setdefault(dtype, [])
    idle = sorted((buf.numel(), i) for i, (buf, count) in enumerate(slots) if _storage_use_count(buf) == count)
    for size, i in idle:
        if size >= numel:
            return slots[i][0][:numel].view(shape)
    if not idle and len(slots) >= _WORKSPACE_SLOTS:  # every slot in use: leave them to their holders
        return torch.empty(shape, dtype=dtype, device=device)
    buf = torch.empty(int(numel * _WORKSPACE_GROWTH), dtype=dtype, device=device)
    entry = (buf, _storage_use_count(buf))
    if idle:
        slots[idle[-1][1]] = entry  # the largest idle one, too small: regrown
    else:
        slots.append(entry)
    return buf[:numel].view(shape)


def held_bytes() -> int:
    """Bytes of CPU memory this thread's workspace holds (every dtype and slot)."""
    return sum(buf.nbytes for slots in _WORKSPACE.buffers.values() for buf, _ in slots)
