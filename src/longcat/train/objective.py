"""The training objective, built once per run and used by the plain step and by the pipeline stages.

    objective = CE / N_labels + w_mtp * CE_mtp / N_mtp + lambda * z / N_real        (LM terms)
              + alpha / (A * dp) * sum_layers LB_layer                              (load balance)

CE, MTP and the hidden z-loss (arXiv 2509.01322 Eq. 10) are sums over the micro-batch divided by the global
batch's ``GlobalTokenCounts`` (all micro-batches, all dp ranks), so any split of the global batch
gives the same objective. The load-balance loss (Eq. 3-5) is defined per micro-batch and MoE layer
and averaged over the global batch's micro-batches (A per dp rank); its FFN-expert groups D are
``moe.lb_num_groups`` or, by default, the EP degree (the paper's devices). alpha is read at every
micro-batch from ``lb_coef`` (the stability monitor's automatic alpha under ``moe.auto_lb_coef``), so
a new alpha reaches every micro-batch of the next step, on every pipeline stage alike. Under tensor
parallelism the logits are vocab-sharded and CE is the vocab-parallel one. Under context parallelism
each cp rank holds S/cp tokens of every micro-batch: its CE / MTP / z sums cover its own tokens (the
counts are the global batch's), the MTP labels are shifted on the global sequence before the split
(``mtp_labels_BS``), and the LB statistics are summed over cp before Eq. 3-5 (``load_balance``), so the
LB term is the micro-batch's, identical on every cp rank. The forward runs under autocast (bf16 with
``train.bf16``); the losses themselves are taken in fp32 outside it. With ``loss.lm_head_ce=fused``
(the default) the CE and MTP sums are taken inside the forward, fused with the LM head's GEMM
(``longcat.distributed.linear_cross_entropy``, vocab-parallel under TP): the model gets the labels and
returns the sums, and the [B, S, V] logits never exist.

``Trainer.forward_backward`` uses ``lm_terms`` and ``load_balance`` (it also needs the per-layer LB
terms and the LM part alone for R_g); a pipeline stage (``longcat.model.parallel.pipeline``) gets
this object injected and uses ``load_balance_loss``, ``head_loss`` and ``aux_terms``.

Shapes: B micro-batch size, S sequence length, V vocabulary (V/tp when vocab-parallel), D hidden size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist

from longcat.config.schema import LMHeadCE, LossConfig, ModelConfig, MoEConfig
from longcat.distributed.collectives import all_reduce_sum
from longcat.distributed.tensor_parallel import vocab_parallel_cross_entropy_sum
from longcat.model.moe import MoEStats
from longcat.train import losses

__all__ = ["LMTerms", "LoadBalanceTerms", "TrainingObjective"]


@dataclass
class LMTerms:
    """One micro-batch's LM terms, each already normalised (fp32 [], with grad); None = switched off.
    total: ce (+ mtp) (+ z), summed in that order as the terms were formed."""

    ce: torch.Tensor
    mtp: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    total: torch.Tensor


@dataclass
class LoadBalanceTerms:
    """One micro-batch's load-balance terms: per MoE layer Eq. 3-5 without alpha (fp32 [], with grad
    through the router probabilities), and the factor ``alpha / (A * dp)`` they enter with."""

    raw_L: list[torch.Tensor]
    scale: float

    def total(self) -> torch.Tensor:
        total = sum(self.raw_L)
        assert isinstance(total, torch.Tensor)  # raw_L has one term per MoE layer, never none
        return total * self.scale

    def per_layer(self) -> list[torch.Tensor]:
        return [t * self.scale for t in self.raw_L]


class TrainingObjective:
    """CE + MTP + hidden z + load balance, normalised as in the module docstring.

    Args:
        loss_cfg: ``mtp_weight``, ``z_loss_coef``, ``lm_head_ce`` (fused head + CE, or logits).
        moe_cfg: ``expected_ffn_experts``, ``lb_num_groups`` (0 = ``ep_size``), ``lb_loss_coef``
            (alpha when ``lb_coef`` is not given).
        model_cfg: ``n_routed_experts``, ``moe_topk``.
        num_microbatches: A, micro-batches per step of each dp rank.
        dp_size: the dense data-parallel degree.
        ep_size: the expert-parallel degree (the default number of LB groups).
        tp_group: the group the vocabulary is split over (vocab-parallel CE); None without TP.
        cp_group: the context-parallel group, whose ranks hold parts of the same micro-batches (the
            LB statistics are summed over it); None (or size 1) without CP.
        autocast_dtype: run forwards under ``torch.autocast`` with this dtype; None = no autocast.
        lb_coef: returns the alpha in use; read at every micro-batch. Default: ``moe_cfg.lb_loss_coef``.
    """

    TERM_NAMES = ("ce", "mtp", "z", "lb")  # the order of ``head_loss`` / ``aux_terms`` vectors

    def __init__(self, *, loss_cfg: LossConfig, moe_cfg: MoEConfig, model_cfg: ModelConfig, num_microbatches: int,
                 dp_size: int, ep_size: int, tp_group: Optional[dist.ProcessGroup] = None,
                 cp_group: Optional[dist.ProcessGroup] = None,
                 autocast_dtype: Optional[torch.dtype] = None, lb_coef: Optional[Callable[[], float]] = None):
        self.mtp_weight = loss_cfg.mtp_weight
        self.z_loss_coef = loss_cfg.z_loss_coef
        self.lm_head_ce = LMHeadCE(loss_cfg.lm_head_ce)
        self.n_routed_experts, self.moe_topk = model_cfg.n_routed_experts, model_cfg.moe_topk
        self.expected_ffn_experts = moe_cfg.expected_ffn_experts
        self.lb_num_groups = moe_cfg.lb_num_groups or ep_size
        self.lb_average = num_microbatches * dp_size  # the LB loss averages over the global batch's micro-batches
        self.tp_group = tp_group
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        self.autocast_dtype = autocast_dtype
        configured = float(moe_cfg.lb_loss_coef)
        self._lb_coef = lb_coef if lb_coef is not None else (lambda: configured)

    # ---------------------------------------------------------------- settings
    @property
    def lb_coef(self) -> float:
        """alpha in use now."""
        return self._lb_coef()

    @property
    def fused_head(self) -> bool:
        """Whether the model takes the head's CE itself (``loss.lm_head_ce=fused``): forwards then get the
        labels and return ``ce_sum`` / ``mtp_ce_sum`` instead of logits."""
        return self.lm_head_ce is LMHeadCE.fused

    @property
    def wants_mtp(self) -> bool:
        return self.mtp_weight > 0

    @property
    def wants_hidden_z(self) -> bool:
        return self.z_loss_coef > 0

    def autocast(self, device: torch.device) -> ContextManager[None]:
        """The forward's autocast context on ``device`` (a no-op context without ``autocast_dtype``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # ---------------------------------------------------------------- terms
    def ce_sum(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor, *, vocab_parallel: bool) -> torch.Tensor:
        """Summed token cross-entropy over labelled positions (fp32 []), vocab-parallel when the logits
        are this tp rank's vocab shard [B, S, V/tp]."""
        if vocab_parallel:
            assert self.tp_group is not None  # vocab-parallel logits come from a TP model
            return vocab_parallel_cross_entropy_sum(logits_BSV, labels_BS, tp_group=self.tp_group,
                                                    ignore_index=losses.IGNORE_INDEX)
        return losses.cross_entropy_sum(logits_BSV, labels_BS)

    def lm_terms(self, *, logits_BSV: Optional[torch.Tensor], mtp_logits_BSV: Optional[torch.Tensor],
                 last_hidden_BSD: Optional[torch.Tensor], labels_BS: torch.Tensor, token_mask_BS: torch.Tensor,
                 counts: losses.GlobalTokenCounts, vocab_parallel: bool,
                 mtp_labels_BS: Optional[torch.Tensor] = None, ce_sum: Optional[torch.Tensor] = None,
                 mtp_ce_sum: Optional[torch.Tensor] = None) -> LMTerms:
        """CE (+ MTP when ``wants_mtp`` and the model has the head) (+ hidden z when ``wants_hidden_z``;
        ``last_hidden_BSD`` [B, S, D] the last layer's output before the final norm, full over tp).
        The CE sums come from the logits, or, from a fused head (``fused_head``), as ``ce_sum`` /
        ``mtp_ce_sum`` (the model's, taken against ``labels_BS`` / ``mtp_labels_for(labels_BS)``).
        ``mtp_labels_BS``: the MTP head's labels, default ``losses.mtp_labels(labels_BS)``; under
        context parallelism pass the cp split of the global sequence's (the shift crosses chunks)."""
        if ce_sum is None:
            assert logits_BSV is not None, "lm_terms needs the logits or the fused head's ce_sum"
            ce_sum = self.ce_sum(logits_BSV, labels_BS, vocab_parallel=vocab_parallel)
        ce = ce_sum / counts.num_labels
        total = ce
        mtp = z = None
        if self.wants_mtp and mtp_ce_sum is None and mtp_logits_BSV is not None:
            mtp_ce_sum = self.ce_sum(mtp_logits_BSV, self.mtp_labels_for(labels_BS, mtp_labels_BS),
                                     vocab_parallel=vocab_parallel)
        if self.wants_mtp and mtp_ce_sum is not None:
            mtp = self.mtp_weight * mtp_ce_sum / counts.num_mtp_labels
            total = total + mtp
        if self.wants_hidden_z:
            assert last_hidden_BSD is not None, "the hidden z-loss needs the last hidden state"
            z = self.z_loss_coef * losses.hidden_z_loss_sum(last_hidden_BSD, token_mask_BS) / counts.num_real
            total = total + z
        return LMTerms(ce=ce, mtp=mtp, z=z, total=total)

    @staticmethod
    def mtp_labels_for(labels_BS: torch.Tensor, mtp_labels_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MTP head's labels: ``mtp_labels_BS`` when given (context parallelism), else
        ``losses.mtp_labels(labels_BS)``."""
        return losses.mtp_labels(labels_BS) if mtp_labels_BS is None else mtp_labels_BS

    def load_balance(self, stats: Sequence[MoEStats]) -> Optional[LoadBalanceTerms]:
        """The LB terms of ``stats`` (one MoEStats per MoE layer, never pooled over layers); None when
        alpha is 0 or there are no layers."""
        alpha = self.lb_coef
        if alpha <= 0 or not stats:
            return None
        if self.cp_group is not None:
            stats = self._summed_over_cp(stats)
        raw_L = [
            losses.load_balance_loss(
                s.expert_counts_E, s.prob_sum_E, s.num_tokens, n_routed_experts=self.n_routed_experts,
                moe_topk=self.moe_topk, expected_ffn_experts=self.expected_ffn_experts, num_groups=self.lb_num_groups)
            for s in stats
        ]
        return LoadBalanceTerms(raw_L=raw_L, scale=alpha / self.lb_average)

    def _summed_over_cp(self, stats: Sequence[MoEStats]) -> list[MoEStats]:
        """The micro-batch's statistics from each cp rank's share: counts and tokens summed over cp
        (no grad), the probability sums through ``all_reduce_sum`` (backward: identity, so each rank's
        router receives d(LB)/dP for its own tokens and the dense-grad sum over cp completes it)."""
        assert self.cp_group is not None
        E = stats[0].expert_counts_E.shape[-1]
        # [L, E + 1] (counts, tokens) -> all_reduce(sum, cp) -> [L, E + 1]; per layer the [E] prob sums
        # likewise, with grad (one all-reduce per layer keeps the layers' graphs apart: R_g takes each
        # layer's LB gradient on its own)
        counts_LX = torch.stack([torch.cat([s.expert_counts_E.float(), s.num_tokens.float().reshape(1)])
                                 for s in stats]).detach()
        dist.all_reduce(counts_LX, group=self.cp_group)
        return [MoEStats(expert_counts_E=counts_LX[layer, :E],
                         prob_sum_E=all_reduce_sum(s.prob_sum_E, group=self.cp_group),
                         num_tokens=counts_LX[layer, E], ffn_per_token_T=s.ffn_per_token_T)
                for layer, s in enumerate(stats)]

    # ---------------------------------------------------------------- what a pipeline stage uses
    def load_balance_loss(self, stats: Sequence[MoEStats]) -> Optional[torch.Tensor]:
        """The alpha-scaled LB loss of ``stats``' layers (fp32 []), or None."""
        lb = self.load_balance(stats)
        return None if lb is None else lb.total()

    def head_loss(self, *, logits_BSV: Optional[torch.Tensor], mtp_logits_BSV: Optional[torch.Tensor],
                  last_hidden_BSD: Optional[torch.Tensor], labels_BS: torch.Tensor, token_mask_BS: torch.Tensor,
                  counts: losses.GlobalTokenCounts, vocab_parallel: bool,
                  lb: Optional[torch.Tensor],
                  mtp_labels_BS: Optional[torch.Tensor] = None, ce_sum: Optional[torch.Tensor] = None,
                  mtp_ce_sum: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last stage's (micro-batch objective fp32 [], its terms float64 [4] detached): the LM
        terms of its heads (``lm_terms``) plus its own layers' LB loss ``lb``, summed in the order of
        the plain step."""
        lm = self.lm_terms(logits_BSV=logits_BSV, mtp_logits_BSV=mtp_logits_BSV, last_hidden_BSD=last_hidden_BSD,
                           labels_BS=labels_BS, token_mask_BS=token_mask_BS, counts=counts,
                           vocab_parallel=vocab_parallel, mtp_labels_BS=mtp_labels_BS, ce_sum=ce_sum,
                           mtp_ce_sum=mtp_ce_sum)
        objective = lm.total
        if lb is not None:
            objective = objective + lb
        return objective, self._terms(lm.ce, lm.mtp, lm.z, lb, like=lm.ce)

    def aux_terms(self, lb: Optional[torch.Tensor], *, like: torch.Tensor) -> torch.Tensor:
        """A non-last stage's terms float64 [4] (only its layers' LB loss; zeros elsewhere)."""
        return self._terms(None, None, None, lb, like=like)

    def eval_sums(self, logits_BSV: Optional[torch.Tensor], labels_BS: torch.Tensor, *, vocab_parallel: bool,
                  ce_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float64 [2]: (summed token cross-entropy, labelled tokens) of one evaluation micro-batch, from
        its logits or the fused head's ``ce_sum``."""
        if ce_sum is None:
            assert logits_BSV is not None, "eval_sums needs the logits or the fused head's ce_sum"
            ce_sum = self.ce_sum(logits_BSV, labels_BS, vocab_parallel=vocab_parallel)
        return torch.stack([ce_sum.double(), (labels_BS != losses.IGNORE_INDEX).sum().double()])

    @staticmethod
    def _terms(*terms: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        zero = like.new_zeros((), dtype=torch.float32)
        return torch.stack([zero if t is None else t for t in terms]).detach().to(torch.float64)
