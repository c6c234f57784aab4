"""The shortcut-connected MoE (ScMoE) decoder layer (arXiv 2509.01322 §2, reference ``LongcatFlashDecoderLayer``).

    h   = h + MLA0(n_in0(h))
    u   = n_post0(h);   moe = MoE(u);   h = h + FFN0(u)
    h   = h + MLA1(n_in1(h))
    h   = h + FFN1(n_post1(h)) + moe

The MoE reads the same normed input as FFN0; its output joins at the very end of the layer, which
lets its dispatch/combine overlap the dense half (§5.3; docs/architecture.md).
With ``overlap_moe_comm`` (the default) the layer runs

    h += MLA0(n_in0(h));  u = n_post0(h)
    router(u); dispatch all-to-all launched               ─┐ the exchange is in flight
    h += FFN0(u);  h += MLA1(n_in1(h))                    ─┘ while the dense branch computes
    wait dispatch; grouped expert GEMM; combine launched  ─┐
    f = FFN1(n_post1(h))                                  ─┘
    wait combine;  h = h + f + moe

and without it the MoE runs whole before the dense branch (the sequential order). The backward
mirrors the schedule: each all-to-all is an issue node and a wait node
(``longcat.distributed.collectives``), and the dense work recorded between them has its backward
run while the gradient's exchange is in flight. Both orders compute the same operations on the
same values, and every gradient that joins dense and MoE contributions is summed in a fixed order
(``_branch``), so the two give bit-identical outputs and gradients.

The MoE always sees and returns the full [B, S, D]. Under sequence parallelism (residual stream
[B, S/tp, D], ``longcat.model.parallel.tensor_parallel``) ``moe_input_region`` gathers its input over
the sequence and ``moe_output_region`` keeps this rank's sequence shard of its output; both are
identities otherwise.

Shape legend:
    B  batch
    S  sequence
    D  hidden_size
    P  qk_rope_head_dim / 2 rotary pairs
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from longcat.config.schema import ModelConfig
from longcat.model.attention import MultiHeadLatentAttention
from longcat.model.mlp import SwiGLU
from longcat.model.moe import MoE, MoEStats
from longcat.model.norm import RMSNorm


class _Branch(torch.autograd.Function):
    """x -> (x, x) for the dense branch and the MoE; backward: dense grad + MoE grad, always in that
    grouping, whatever order the autograd engine delivers them in (a bare tensor used twice would
    sum its consumers' grads in arrival order, and the schedule changes the arrival order)."""

    @staticmethod
    def forward(ctx, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_BSD.view_as(x_BSD), x_BSD.view_as(x_BSD)

    @staticmethod
    def backward(ctx, grad_dense_BSD: torch.Tensor, grad_moe_BSD: torch.Tensor) -> torch.Tensor:
        return grad_dense_BSD + grad_moe_BSD


def _branch(x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (torch.is_grad_enabled() and x_BSD.requires_grad):
        return x_BSD, x_BSD
    return _Branch.apply(x_BSD)


class DecoderLayer(nn.Module):
    """Two MLA blocks, two dense SwiGLU FFNs and one MoE; names as in the checkpoint
    (``self_attn.{0,1}``, ``mlps.{0,1}``, ``input_layernorm.{0,1}``, ``post_attention_layernorm.{0,1}``,
    ``mlp``).

    ``overlap_moe_comm`` (attribute, default True; from ``ParallelConfig.overlap_moe_comm`` via
    ``longcat.model.parallel.expert_parallel.apply_moe_overlap``): run the MoE's exchanges under the
    dense branch (True) or the MoE whole before it (False). Same numbers either way.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = nn.ModuleList([MultiHeadLatentAttention(cfg) for _ in range(2)])
        self.mlps = nn.ModuleList([SwiGLU(D, intermediate_size=cfg.ffn_hidden_size) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(D, eps=eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(D, eps=eps) for _ in range(2)])
        self.mlp = MoE(cfg)
        self.moe_input_region: nn.Module = nn.Identity()
        self.moe_output_region: nn.Module = nn.Identity()
        self.overlap_moe_comm = True

    def forward(
        self,
        h_BSD: torch.Tensor,
        *,
        cos_BSP: torch.Tensor,
        sin_BSP: torch.Tensor,
        token_mask_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats]:
        """h_BSD [B, S, D] -> (h_BSD [B, S, D], this layer's MoEStats)."""
        h_BSD = h_BSD + self.self_attn[0](self.input_layernorm[0](h_BSD), cos_BSP=cos_BSP, sin_BSP=sin_BSP)
        u_dense_BSD, u_moe_BSD = _branch(self.post_attention_layernorm[0](h_BSD))
        ffn1_BSD = None

        def ffn0_and_attn1() -> None:  # under the dispatch
            nonlocal h_BSD
            h_BSD = h_BSD + self.mlps[0](u_dense_BSD)
            h_BSD = h_BSD + self.self_attn[1](self.input_layernorm[1](h_BSD), cos_BSP=cos_BSP, sin_BSP=sin_BSP)

        def ffn1() -> None:  # under the combine
            nonlocal ffn1_BSD
            ffn1_BSD = self.mlps[1](self.post_attention_layernorm[1](h_BSD))

        dense_steps = (ffn0_and_attn1, ffn1)
        # The MoE is called as a module (its hooks fire) and runs the dense steps between its own.
        moe_BSD, stats = self.mlp(
            self.moe_input_region(u_moe_BSD),
            token_mask_BS=token_mask_BS,
            overlap_with=dense_steps if self.overlap_moe_comm else (),
        )
        if not self.overlap_moe_comm:
            for step in dense_steps:
                step()
        assert ffn1_BSD is not None  # ffn1 ran, inside the MoE or just above
        return h_BSD + ffn1_BSD + self.moe_output_region(moe_BSD), stats


def as_decoder_layers(modules: Iterable[nn.Module]) -> list[DecoderLayer]:
    """``modules`` (a model's ``layers`` container, or a selection of it) as the ``DecoderLayer`` s they
    are (FSDP2 subclasses a module's class, so a sharded layer still is one)."""
    layers = []
    for module in modules:
        assert isinstance(module, DecoderLayer), type(module)
        layers.append(module)
    return layers
