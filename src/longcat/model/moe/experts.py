"""FFN experts as stacked weights run with one grouped GEMM per projection (arXiv 2509.01322 §2.1).

Weights are stacked per local expert; row l is global expert ``expert_offset + l`` and equals the
released ``mlp.experts.{i}.{gate,up,down}_proj.weight``.

Shape legend:
    R  routed rows (token copies), grouped by local expert
    L  num_local_experts
    D  hidden_size
    I  expert_ffn_hidden_size
    K, N  in / out features of one ``grouped_linear`` (D, I or I, D)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat.model.moe.workspace import plain_eager, scratch


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def grouped_linear(x_RK: torch.Tensor, weight_LNK: torch.Tensor, *, offs_L: torch.Tensor) -> torch.Tensor:
    """Per-group ``x @ weight[l]^T``: rows ``offs[l-1]:offs[l]`` of x use weight l. Returns [R, N].

    One ``torch.nn.functional.grouped_mm`` call (an empty group yields no rows and zero weight grads).
    grouped_mm needs 16-byte aligned base pointers and row strides in forward and backward (K and N
    multiples of 8 in bf16, of 4 in fp32); other sizes are zero-padded to multiples of 8 for the call
    (enough for either dtype, also if autocast casts fp32 operands to bf16), which leaves the result
    and the gradients unchanged. A weight in another dtype is cast to x's. Under autocast (bf16 on
    GPU with ``train.bf16``) both operands are cast to the autocast dtype, as autocast does for
    ``F.linear`` (grouped_mm is not on autocast's cast lists, so without this the experts of a bf16
    run would compute in fp32); the result is then in that dtype.
    """
    N, K = weight_LNK.shape[-2:]
    device_type = x_RK.device.type
    if torch.is_autocast_enabled(device_type) and x_RK.is_floating_point():
        compute_dtype = torch.get_autocast_dtype(device_type)
        if x_RK.dtype != compute_dtype:
            x_RK = x_RK.to(compute_dtype)
    if weight_LNK.dtype != x_RK.dtype:
        weight_LNK = weight_LNK.to(x_RK.dtype)
    if not x_RK.is_contiguous():
        x_RK = x_RK.contiguous()
    align = 8
    pad_k, pad_n = (-K) % align, (-N) % align
    if pad_k or pad_n:
        x_RK = F.pad(x_RK, (0, pad_k))
        weight_LNK = F.pad(weight_LNK, (0, pad_k, 0, pad_n))
    if x_RK.data_ptr() % 16:
        x_RK = x_RK.clone()
    if weight_LNK.data_ptr() % 16:
        weight_LNK = weight_LNK.clone()
    out_RN = F.grouped_mm(x_RK, weight_LNK.transpose(-2, -1), offs=offs_L)
    if out_RN.requires_grad:
        # grouped_mm's CPU backward rejects expanded/strided gradients ("Invalid strides/sizes"). A
        # tensor hook rather than an identity autograd.Function: that one would return a view, and
        # the experts' output is an FSDP2 module output (views there lose FSDP's pre-backward hook
        # under in-place ops, and FSDP2 warns on every forward).
        out_RN.register_hook(_contiguous)
    # The column slice is a view: copy it (same reason).
    return out_RN[:, :N].contiguous() if pad_n else out_RN


class _CPUGroupedProjections(torch.autograd.Function):
    """(offs_L, tokens_RK, weight_LNK, ...) -> one [R, N] ``x_l @ weight_l^T`` per weight, for plain fp32 CPU
    tensors (the experts' gate and up projections share their input; the down projection is alone).

    Forward: ``grouped_mm`` per weight, as ``grouped_linear``. Backward, per expert l (rows
    ``offs[l-1]:offs[l]``): the input gradient ``sum_w g_w,l @ weight_w,l`` into one [R, K] tensor in
    the CPU workspace, the first product by ``mm`` into it, each further one by ``mm`` into a small
    per-expert buffer (cache-sized) and added (autograd forms one fresh [R, K] gradient per weight and
    adds them: at 16k rows x 512, a 32 MiB buffer faulted in and a pass over it); each weight gradient
    ``g_w,l^T @ x_l`` (as grouped_mm's CPU backward, which loops the same ``mm``; an expert without rows
    gets zeros, rows past the last offset no input gradient). Every value has the bits of grouped_mm's
    autograd (tests/unit/model/test_model_moe.py, also at an inner dim over BLAS's block: ``addmm_``
    would differ there, as it adds into C block by block). bf16 keeps ``grouped_linear`` (autocast, and
    its casts). The row bounds are read on the host once per forward (a CPU tensor: no device
    synchronisation). Under a schedule that splits the backward into an input- and a weight-gradient
    pass (``zbv``), each pass runs this backward whole (``needs_input_grad`` is fixed at forward):
    correct, but the experts' backward GEMMs run twice on that CPU fp32 path."""

    @staticmethod
    def forward(ctx, offs_L: torch.Tensor, tokens_RK: torch.Tensor, *weights_LNK: torch.Tensor):
        ctx.save_for_backward(tokens_RK, *weights_LNK)
        with torch._C.DisableTorchFunction():  # a CPU-only host read: not counted as a device sync
            ctx.ends = offs_L.tolist()
        return tuple(F.grouped_mm(tokens_RK, w_LNK.transpose(-2, -1), offs=offs_L) for w_LNK in weights_LNK)

    @staticmethod
    def backward(ctx, *grads_RN: torch.Tensor):
        tokens_RK, *weights_LNK = ctx.saved_tensors
        need_x, *need_w = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph=True: autograd's own graph (double backward)
            offs_L = torch.tensor(ctx.ends, dtype=torch.int32)
            outs = [F.grouped_mm(tokens_RK, w_LNK.transpose(-2, -1), offs=offs_L) for w_LNK in weights_LNK]
            inputs = (tokens_RK, *weights_LNK)
            needed = [t for t, need in zip(inputs, ctx.needs_input_grad[1:]) if need]
            grads = iter(torch.autograd.grad(outs, needed, grads_RN, create_graph=True, allow_unused=True))
            return (None, *(next(grads) if need else None for need in ctx.needs_input_grad[1:]))
        grads_RN = tuple(g.contiguous() for g in grads_RN)
        grad_x_RK = scratch(tokens_RK.shape, dtype=tokens_RK.dtype, device=tokens_RK.device) if need_x else None
        grads_w = [torch.empty_like(w) if need else None for w, need in zip(weights_LNK, need_w)]
        product_rK = None  # one expert's product with a later weight: rows x K, stays in the CPU's cache
        if grad_x_RK is not None and len(weights_LNK) > 1:
            most_rows = max((hi - lo for lo, hi in zip([0, *ctx.ends], ctx.ends)), default=0)
            product_rK = tokens_RK.new_empty(most_rows, tokens_RK.shape[-1])
        lo = 0
        for e, hi in enumerate(ctx.ends):
            x_rK = tokens_RK[lo:hi]
            for w, (w_LNK, g_RN) in enumerate(zip(weights_LNK, grads_RN)):
                g_rN = g_RN[lo:hi]
                if grad_x_RK is not None:
                    if w == 0:
                        torch.mm(g_rN, w_LNK[e], out=grad_x_RK[lo:hi])
                    else:  # mm, then add: BLAS's addmm_ adds into C per block of the inner dim (other bits)
                        assert product_rK is not None
                        grad_x_RK[lo:hi].add_(torch.mm(g_rN, w_LNK[e], out=product_rK[: hi - lo]))
                grad_w = grads_w[w]
                if grad_w is not None:
                    torch.mm(g_rN.t(), x_rK, out=grad_w[e])
            lo = hi
        if grad_x_RK is not None and lo < grad_x_RK.shape[0]:  # rows past the last offset: no expert, no grad
            grad_x_RK[lo:].zero_()
        return None, grad_x_RK, *grads_w


def grouped_projections(tokens_RK: torch.Tensor, *weights_LNK: torch.Tensor,
                        offs_L: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``grouped_linear(tokens_RK, w, offs_L=offs_L)`` for each weight -> one [R, N] per weight, the same bits
    forward and backward. Plain contiguous fp32 CPU operands outside autocast, with K and every N
    multiples of 8, take ``_CPUGroupedProjections`` (one input-gradient buffer, in the CPU workspace);
    anything else (CUDA, bf16, autocast, DTensor or fake tensors, no grad) ``grouped_linear`` per weight."""
    K = tokens_RK.shape[-1]
    operands = (tokens_RK, *weights_LNK)
    if (all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
            and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in operands)
            and offs_L.device.type == "cpu" and K % 8 == 0 and all(w.shape[-2] % 8 == 0 for w in weights_LNK)
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and plain_eager()):
        return _CPUGroupedProjections.apply(offs_L, tokens_RK, *weights_LNK)
    return tuple(grouped_linear(tokens_RK, w, offs_L=offs_L) for w in weights_LNK)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` for [R, I] operands, with the bits of autograd's ``F.silu(gate) * up`` and its
    backward, but only the product in fresh memory: ``silu(gate)`` (in forward, and again in backward
    instead of being kept), ``grad * up`` and the two input gradients are written into the CPU
    workspace (``longcat.model.moe.workspace``; the gradients keep their slots busy until autograd has
    used them). Saves gate and up (autograd's version also keeps ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate_RI: torch.Tensor, up_RI: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_RI, up_RI)
        silu_RI = torch.ops.aten.silu.out(gate_RI, out=scratch(gate_RI.shape, dtype=gate_RI.dtype,
                                                                device=gate_RI.device))
        return torch.mul(silu_RI, up_RI)

    @staticmethod
    def backward(ctx, grad_RI: torch.Tensor):
        gate_RI, up_RI = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: autograd's own graph of the expression (double backward)
            out_RI = F.silu(gate_RI) * up_RI
            return torch.autograd.grad(out_RI, (gate_RI, up_RI), grad_RI, create_graph=True)
        grad_gate_RI = grad_up_RI = None
        shape, dtype, device = grad_RI.shape, torch.result_type(grad_RI, up_RI), grad_RI.device
        if ctx.needs_input_grad[1]:
            silu_RI = torch.ops.aten.silu.out(gate_RI, out=scratch(gate_RI.shape, dtype=gate_RI.dtype,
                                                                    device=gate_RI.device))
            grad_up_RI = torch.mul(grad_RI, silu_RI, out=scratch(shape, dtype=dtype, device=device))
            del silu_RI
        if ctx.needs_input_grad[0]:
            grad_silu_RI = torch.mul(grad_RI, up_RI, out=scratch(shape, dtype=dtype, device=device))
            grad_gate_RI = torch.ops.aten.silu_backward.grad_input(
                grad_silu_RI, gate_RI, grad_input=scratch(shape, dtype=dtype, device=device))
        return grad_gate_RI, grad_up_RI


def swiglu(gate_RI: torch.Tensor, up_RI: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate_RI) * up_RI`` (the same bits, forward and backward) -> [R, I]; see ``_SwiGLU``.
    Operands of different dtypes or shapes (not the experts' case) or tensor subclasses take the plain
    expression. A backward with ``create_graph=True`` computes with differentiable ops (second derivatives
    are autograd's)."""
    if gate_RI.dtype != up_RI.dtype or gate_RI.shape != up_RI.shape or not (
            type(gate_RI) is torch.Tensor and type(up_RI) is torch.Tensor):  # noqa: E721 (subclasses: plain ops)
        return F.silu(gate_RI) * up_RI
    return _SwiGLU.apply(gate_RI, up_RI)


class GroupedExperts(nn.Module):
    """SwiGLU experts ``down(silu(gate(x)) * up(x))`` for ``num_local_experts`` consecutive global ids.

    Parameters (names map onto the checkpoint's per-expert weights by row):
        gate_proj [L, I, D], up_proj [L, I, D], down_proj [L, D, I].

    Args:
        hidden_size: D.
        intermediate_size: I.
        num_local_experts: L.
        expert_offset: global id of local expert 0 (0 without expert parallelism).
    """

    def __init__(self, hidden_size: int, *, intermediate_size: int, num_local_experts: int, expert_offset: int = 0):
        super().__init__()
        if num_local_experts <= 0 or expert_offset < 0:
            raise ValueError(
                f"num_local_experts={num_local_experts} must be > 0 and expert_offset={expert_offset} >= 0"
            )
        self.num_local_experts = num_local_experts
        self.expert_offset = expert_offset
        self.gate_proj = nn.Parameter(torch.empty(num_local_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_local_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, hidden_size, intermediate_size))

    def forward(self, tokens_RD: torch.Tensor, *, counts_L: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
        """tokens_RD [R, D] sorted by local expert; counts_L [L'] rows per expert -> [R, D].

        Runs local experts ``[first_expert, first_expert + L')`` (default: all L); a chunked
        dispatcher runs each chunk's experts separately. Every expert computes exactly what it
        computes in one call over all experts (same rows, same GEMM per expert).
        """
        L = self.num_local_experts
        num = counts_L.shape[0] if counts_L.dim() == 1 else -1
        if num <= 0 or first_expert < 0 or first_expert + num > L:
            raise ValueError(
                f"counts_L has shape {tuple(counts_L.shape)} at first_expert={first_expert}, expected [L'] with "
                f"first_expert + L' <= {L}"
            )
        weights: tuple[torch.Tensor, ...] = (self.gate_proj, self.up_proj, self.down_proj)
        if num != L:
            weights = tuple(w.narrow(0, first_expert, num) for w in weights)
        gate_LID, up_LID, down_LDI = weights
        offs_L = torch.cumsum(counts_L, dim=0, dtype=torch.int32)
        gate_RI, up_RI = grouped_projections(tokens_RD, gate_LID, up_LID, offs_L=offs_L)
        (out_RD,) = grouped_projections(swiglu(gate_RI, up_RI), down_LDI, offs_L=offs_L)
        return out_RD

    @torch.no_grad()
    def narrow_(self, *, expert_offset: int, num_local_experts: int) -> None:
        """Keep only global experts ``[expert_offset, expert_offset + num_local_experts)`` (in place;
        expert parallelism). The parameters are replaced by new ones (same names, fewer rows, same
        dtype, device and requires_grad), so build the optimizer afterwards. Works on meta tensors.

        Raises:
            ValueError: the range is not inside the experts held now.
        """
        first = expert_offset - self.expert_offset
        if num_local_experts <= 0 or first < 0 or first + num_local_experts > self.num_local_experts:
            raise ValueError(
                f"cannot narrow to experts [{expert_offset}, {expert_offset + num_local_experts}): this module "
                f"holds [{self.expert_offset}, {self.expert_offset + self.num_local_experts})"
            )
        for name in ("gate_proj", "up_proj", "down_proj"):
            old = getattr(self, name)
            rows = old.narrow(0, first, num_local_experts).clone()
            setattr(self, name, nn.Parameter(rows, requires_grad=old.requires_grad))
        self.num_local_experts = num_local_experts
        self.expert_offset = expert_offset

    def extra_repr(self) -> str:
        L, I, D = self.gate_proj.shape
        return f"num_local_experts={L}, expert_offset={self.expert_offset}, hidden={D}, intermediate={I}"
