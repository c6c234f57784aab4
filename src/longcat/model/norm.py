"""RMSNorm with fp32 statistics (arXiv 2509.01322 §2: pre-RMSNorm everywhere, eps 1e-5).

Shape legend:
    *  any leading dims
    D  normalised (last) dim
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` with the statistics computed in fp32.

    The normalised value is cast back to the input dtype *before* the weight multiply, as in the
    reference implementation (``LongcatFlashRMSNorm``), so bf16 runs round at the same point.

    Args:
        dim: size D of the normalised last dim.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_xD: torch.Tensor) -> torch.Tensor:
        """x_xD [*, D] -> [*, D] in x's dtype (promoted with the weight's dtype)."""
        return rms_norm(x_xD, self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm(x_xD: torch.Tensor, weight_D: torch.Tensor, *, eps: float) -> torch.Tensor:
    """The math of ``RMSNorm.forward`` with an explicit weight (tensor parallelism routes the weight
    through a collective first). x_xD [*, D], weight_D [D] -> [*, D]."""
    x_f32 = x_xD.float()
    x_f32 = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * x_f32.to(x_xD.dtype)
