"""A reused CPU workspace for the MoE's large temporaries (routed rows [R, D], expert activations [R, I]).

Without a caching allocator every large CPU tensor is fresh memory from the OS, and faulting it in (the
kernel zero-fills each page) costs about as much as writing it: in the MoE block at 64 + 32 experts,
top-12 (2048 tokens, 16k routed rows of 512 fp32 values, 32 MiB each) the block faulted in 407 MiB per
forward + backward and spent a quarter of its time in the kernel (``docs/benchmarks.md``, MoE block).
The gathers of the token dispatch and the SwiGLU of the experts take their temporaries from here.
On CUDA the caching allocator already reuses blocks, so ``scratch`` is ``torch.empty`` there.
"""

from __future__ import annotations

import math
import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["scratch"]


class _Workspace(threading.local):
    """Per thread: dtype -> (flat CPU buffer, its storage's use count when only this holds it)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, tuple[torch.Tensor, int]] = {}


_WORKSPACE = _Workspace()
_WORKSPACE_GROWTH = 1.125  # headroom over the request: R varies a little from step to step


def _storage_use_count(t: torch.Tensor) -> int:
    # torch's own (private) count of the references to a storage; tests/unit/model/test_model_moe.py fails
    # if it stops seeing views and held tensors
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _plain_eager() -> bool:
    """Whether a workspace tensor made now is an ordinary one: not under ``torch.inference_mode`` (it
    would become an inference tensor, which a later training call may not write to) nor under a
    ``TorchDispatchMode`` such as ``FakeTensorMode`` (it would be a fake tensor)."""
    return not torch.is_inference_mode_enabled() and _get_current_dispatch_mode() is None


def scratch(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` to write a temporary into (``out=``).

    On the CPU it is a view of this thread's reused workspace when no tensor, view or saved tensor
    still holds that workspace (its storage's use count is the idle one), else a new tensor; the
    workspace grows to the largest request (12.5% headroom) and is kept. Elsewhere (CUDA: the caching
    allocator reuses blocks already) always a new tensor. The caller may return the result to
    autograd: while anything holds it, the next request gets a new tensor. Under
    ``torch.inference_mode`` or a dispatch mode (fake tensors, tracing) it is always a new tensor, and
    the workspace is left as it was.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0 or not _plain_eager():
        return torch.empty(shape, dtype=dtype, device=device)
    entry = _WORKSPACE.buffers.get(dtype)
    if entry is not None:
        buf, idle = entry
        if _storage_use_count(buf) != idle:  # in use: leave it to its holder
            return torch.empty(shape, dtype=dtype, device=device)
        if buf.numel() >= numel:
            return buf[:numel].view(shape)
    buf = torch.empty(int(numel * _WORKSPACE_GROWTH), dtype=dtype, device=device)
    _WORKSPACE.buffers[dtype] = (buf, _storage_use_count(buf))
    return buf[:numel].view(shape)
