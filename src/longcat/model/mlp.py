"""Dense SwiGLU feed-forward (the two per-layer FFNs ``mlps.{0,1}`` and the MTP head's FFN).

Shape legend:
    *  any leading dims
    D  hidden_size
    F  intermediate size (ffn_hidden_size: 12288 released; F/tp per rank under tensor parallelism)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases.

    Args:
        hidden_size: D.
        intermediate_size: F.
    """

    def __init__(self, hidden_size: int, *, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        # Tensor parallelism swaps in its region entry here: one collective serves both
        # column-parallel projections (``longcat.model.parallel.tensor_parallel``). Identity otherwise.
        self.input_region: nn.Module = nn.Identity()

    def forward(self, x_xD: torch.Tensor) -> torch.Tensor:
        """x_xD [*, D] -> [*, D]."""
        x_xD = self.input_region(x_xD)
        return self.down_proj(F.silu(self.gate_proj(x_xD)) * self.up_proj(x_xD))
