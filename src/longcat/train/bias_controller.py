"""The expert-bias controller that holds the computation budget on target (arXiv 2509.01322 §2.1.1, Eq. 2).

Once per optimizer step, from the counts of the whole global batch (all micro-batches, all DP ranks;
TP ranks see the same tokens and are not counted twice; padding never counted):

    b_i += mu * ( K_e / (K * N) - T_i / (K * T_all) )      for FFN experts i < N

Zero-expert biases stay fixed. At the fixed point FFN experts receive K_e / K of all assignments, i.e.
an average of K_e FFN experts per token. The rate ``mu`` follows ``moe.bias_update_schedule``.
Counts are accumulated in float64 and reduced with one all-reduce, so every rank computes the same
update from the same numbers and the biases stay bitwise identical across ranks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from longcat.config.schema import BiasRateSchedule, ModelConfig, MoEConfig


class ExpertBiasController:
    """Accumulates router counts over a global batch and updates the expert biases (Eq. 2).

    Args:
        num_layers: MoE layers on this rank (a pipeline stage holds a subset).
    """

    def __init__(self, moe_cfg: MoEConfig, model_cfg: ModelConfig, *, num_layers: int, total_steps: int):
        self.cfg = moe_cfg
        self.n_routed = model_cfg.n_routed_experts
        self.topk = model_cfg.moe_topk
        self.total_steps = total_steps
        self.num_updates = 0
        # [L, E + 1]: per-expert assignments and, in the last column, the real-token count.
        self._counts_LE = torch.zeros(num_layers, model_cfg.num_experts_total + 1, dtype=torch.float64)

    def rate(self) -> float:
        """mu for the next update."""
        mu, floor = self.cfg.bias_update_rate, self.cfg.bias_update_rate_min_ratio
        progress = min(1.0, self.num_updates / max(1, self.total_steps))
        schedule = BiasRateSchedule(self.cfg.bias_update_schedule)
        if schedule is BiasRateSchedule.constant:
            return mu
        if schedule is BiasRateSchedule.linear:
            return mu * (1 - (1 - floor) * progress)
        return mu * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def accumulate(self, expert_counts_LE: Sequence[torch.Tensor], num_tokens_L: Sequence[torch.Tensor]) -> None:
        """Add one micro-batch: per layer [E] assignment counts and [] real-token counts."""
        for layer, (counts_E, tokens) in enumerate(zip(expert_counts_LE, num_tokens_L)):
            self._counts_LE[layer, :-1] += counts_E.detach().to("cpu", torch.float64)
            self._counts_LE[layer, -1] += float(tokens)

    def step(self, biases_L: Sequence[torch.Tensor], *, dp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        """Reduce the global batch's counts over ``dp_group``, update ``biases_L`` in place, reset.

        Args:
            biases_L: per local MoE layer the [E] fp32 ``e_score_correction_bias`` buffer.
        Returns:
            [L, E + 1] float64 global counts of this step (for metrics).
        """
        counts_LE = self._counts_LE
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            # [L, E+1] float64 -> all_reduce(sum, dp) -> [L, E+1]
            dist.all_reduce(counts_LE, group=dp_group)
        mu = self.rate()
        n, k, k_e = self.n_routed, self.topk, self.cfg.expected_ffn_experts
        for layer, bias_E in enumerate(biases_L):
            tokens = counts_LE[layer, -1]
            if tokens <= 0 or mu == 0:
                continue
            delta_N = mu * (k_e / (k * n) - counts_LE[layer, :n] / (k * tokens))
            bias_E[:n] += delta_N.to(bias_E.device, bias_E.dtype)
        self.num_updates += 1
        self._counts_LE = torch.zeros_like(counts_LE)
        return counts_LE

    def discard(self) -> torch.Tensor:
        """Drop the accumulated counts without an update (a skipped step); returns [L, E + 1] zeros."""
        self._counts_LE = torch.zeros_like(self._counts_LE)
        return torch.zeros_like(self._counts_LE)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
