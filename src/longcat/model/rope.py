"""Interleaved (DeepSeek) rotary position embedding for the MLA rope dims (arXiv 2509.01322 §2.3.1).

The released checkpoint rotates *adjacent* pairs ``(x0, x1), (x2, x3), ...``, pair j by the angle
``pos * theta^(-2j/R)``. The rotated output is written de-interleaved, ``[rotated evens | rotated
odds]``, exactly like the reference ``apply_rotary_pos_emb_interleave``: queries and keys use the
same layout, so the attention scores equal those of the interleaved output layout, and the
de-interleaved write needs no extra copy.

Shape legend:
    B  batch
    S  sequence
    H  heads (1 for the shared rope key)
    R  qk_rope_head_dim (rotated dims per head)
    P  R / 2 rotary pairs
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the interleaved RoPE; holds no parameters or buffers.

    The inverse frequencies are rebuilt from the config on demand (so a model built on the meta
    device needs no buffer re-initialisation), and the tables for the default positions
    ``0..S-1`` are cached per (S, device, dtype): a training run computes them once.

    Args:
        rope_dim: R, must be even.
        theta: RoPE base (released: 1e7).
    """

    def __init__(self, rope_dim: int, *, theta: float) -> None:
        super().__init__()
        if rope_dim % 2:
            raise ValueError(f"rope_dim={rope_dim} must be even (RoPE rotates pairs)")
        self.rope_dim = rope_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq_P(self, device: torch.device) -> torch.Tensor:
        """[P] fp32 ``1 / theta^(2j/R)``."""
        exponent_P = torch.arange(0, self.rope_dim, 2, dtype=torch.float32, device=device) / self.rope_dim
        return 1.0 / (self.theta**exponent_P)

    def forward(
        self, position_ids_BS: torch.Tensor | None, *, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin), each [B, S, P] (or [1, S, P] for default positions) in ``dtype``.

        ``position_ids_BS`` None means positions ``0..seq_len-1`` for every row (cached).
        """
        if position_ids_BS is None and not torch.is_inference_mode_enabled():  # inference tensors can't train
            key = (seq_len, str(device), dtype)
            if key not in self._cache:
                if len(self._cache) > 8:  # a few distinct lengths at most (train, eval)
                    self._cache.clear()
                positions_1S = torch.arange(seq_len, device=device).unsqueeze(0)
                self._cache[key] = self._tables(positions_1S, dtype)
            return self._cache[key]
        if position_ids_BS is None:
            position_ids_BS = torch.arange(seq_len, device=device).unsqueeze(0)
        return self._tables(position_ids_BS, dtype)

    def _tables(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BSP = position_ids_BS[..., None].float() * self.inv_freq_P(position_ids_BS.device)
        return angles_BSP.cos().to(dtype), angles_BSP.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"rope_dim={self.rope_dim}, theta={self.theta}"


def apply_interleaved_rope(x_BSHR: torch.Tensor, *, cos_BSP: torch.Tensor, sin_BSP: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs of ``x_BSHR`` [B, S, H, R]; returns [B, S, H, R] de-interleaved.

    ``out[..., j] = x[2j] cos_j - x[2j+1] sin_j`` and ``out[..., P + j] = x[2j+1] cos_j + x[2j] sin_j``.
    cos/sin broadcast over H.
    """
    cos_BS1P = cos_BSP.unsqueeze(-2)
    sin_BS1P = sin_BSP.unsqueeze(-2)
    even_BSHP = x_BSHR[..., 0::2]
    odd_BSHP = x_BSHR[..., 1::2]
    return torch.cat([even_BSHP * cos_BS1P - odd_BSHP * sin_BS1P, odd_BSHP * cos_BS1P + even_BSHP * sin_BS1P], dim=-1)
