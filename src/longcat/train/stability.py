"""The stability suite's per-step monitors (arXiv 2509.01322 §3.1.3) and the per-layer router dashboard values.

``StabilityMonitor`` is driven by the trainer once per optimizer step::

    begin_step(step)                     # decides whether R_g is measured this step
    per micro-batch (Trainer.forward_backward):
        sums.add_lb(...) / sums.add_hidden(...)        # into this micro-batch's LossParts
        measure(...)  on the first micro-batch only, before its real backward (when due)
    end_step(sums, routers=...)          # one all-reduce over dp; metrics; automatic alpha

What it logs (names as in ``metrics.jsonl``; L = MoE layer, its global index in the model):

- ``moe/layer{L}/lb_loss``: the layer's alpha-scaled load-balance term of the objective (Eq. 3-5),
  summed over the global batch's micro-batches (they add up to ``loss/lb``). Every step.
- ``moe/layer{L}/rg``: the gradient-norm ratio of Eq. 9, ``||alpha dL_LB/dP|| / ||dL_LM/dP||``,
  P the batch-averaged probability vector, L_LM everything else in the objective (CE, MTP, hidden
  z-loss). Every ``moe.router_health_interval`` steps (0 = never); ``moe/rg_max`` is the worst layer.
- ``moe/lb_coef``: the alpha in use (changes only with ``moe.auto_lb_coef``). Every step.
- ``moe/layer{L}/router_cosine_similarity``: the mean pairwise cosine similarity of the router's
  weight rows; a warning is logged when it first climbs past ``moe.router_collapse_threshold``
  (and again after it has dropped back below and re-crossed). Every step.
- ``hidden/last_l2_norm``: the mean over the global batch's real tokens of ``||h_t||_2``, h the last
  layer's output before the final norm (the input of the hidden z-loss, Eq. 10). Every step.

How R_g is measured. On the first micro-batch of each dp rank, before its real backward, two
``torch.autograd.grad`` calls read the gradients with respect to every layer's router probabilities
``probs_TE`` (``MoEStats.probs_TE``), summed over the real tokens (``router_health.grad_wrt_mean_probs``):
the LB part per layer from that layer's own term (its direct pull on P), the rest of the objective
through the whole graph above the routers. The [L, E] gradients are summed over dp, so R_g (and the
automatic alpha derived from it) is identical on every rank. P lives on the probability simplex, so
R_g compares the gradients' simplex-tangent parts (``router_health.simplex_tangent``: minus their mean
over experts); the all-ones component moves no softmax, and Eq. 3's gradient would otherwise keep a
large one (``alpha * f_j``, all positive) even at perfect balance.

Extra cost on a measuring step: one activation-gradient backward of one micro-batch from the loss
down to the first MoE layer's router (no weight gradients; about one forward's FLOPs), plus, under
activation recompute, one more recompute of those layers; the graph is kept (``retain_graph``)
until the real backward, which is the micro-batch's normal peak anyway. With ``A`` micro-batches per
step and interval ``n`` that is about ``1 / (3 A n)`` of the training compute (interval 10, A = 2:
under 2%). Per step otherwise: one [E, D] Gram matrix per layer (cosine similarity) and one
all-reduce of ``L + 2 + L (K + 1)`` floats (``2 L E`` more on a measuring step).

Under pipeline parallelism the LM part lives on the last stage and the schedule mixes every
micro-batch's gradients with the LB terms of later stages, so the trainer runs the first
micro-batch once more on its own through the stages (``PipelineRunner.run_isolated`` with
``PipelineStageModule.forward_lm_only``, called as ``stage(x, lm_only=True, ...)``: no LB term
anywhere, the last stage returns CE + MTP + z);
its backward chain brings the LM part's gradient back to every stage's routers (activation
gradients only, no weight gradients) and ``measure_pipeline`` takes the LB part from each local
layer's own term, as above. Each stage computes R_g of its layers after the dp sum. Every step, one
all-reduce of ``L_global x (E + K + 4)`` floats over pp brings every stage's per-layer values (router
counts, FFN-experts-per-token histogram, router cosine similarity, R_g on a measuring step) to every
rank: rank 0 logs every layer by its global index, and all ranks apply the same alpha. Extra cost
on a measuring step: one micro-batch's forward and activation-gradient backward through all stages,
run stage after stage (no overlap; under EP its all-to-all rows count in ``ep/dispatched_rows``;
under FSDP2 one more all-gather of every stage's weights, since the pass runs before the schedule and
reshards after it; no gradient is reduced). The hidden-state norm and the per-layer LB metrics are not
logged under pp > 1.

Automatic alpha (``moe.auto_lb_coef``). R_g is linear in alpha, so from a measurement at the alpha
in use the ratios are rescaled to the configured ``moe.lb_loss_coef`` (the ceiling) and
``router_health.suggest_lb_coef`` puts the worst layer on ``moe.rg_threshold``: alpha drops when a
layer's R_g climbs past the threshold and grows back (never above the configured value) when it
falls. A new alpha applies from the next optimizer step, so every micro-batch of a step shares one.
It is part of the trainer state in checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from longcat.config.schema import MoEConfig
from longcat.model.moe import MoEStats, TopKRouter
from longcat.model.parallel.parallelize import ParallelModel
from longcat.train import router_health

logger = logging.getLogger(__name__)


@dataclass
class StabilitySums:
    """One dp rank's sums over the micro-batches of a step (kept in ``LossParts.stability``).

    lb_L: per MoE layer, the alpha-scaled load-balance term (detached floats).
    hidden_norm_sum: sum over real tokens of ``||h_t||_2`` of the last pre-norm hidden state.
    num_hidden_tokens: the real tokens in that sum.
    """

    lb_L: list[float] = field(default_factory=list)
    hidden_norm_sum: float = 0.0
    num_hidden_tokens: float = 0.0

    def add_lb(self, lb_terms_L: Sequence[torch.Tensor]) -> None:
        """Add one micro-batch's per-layer alpha-scaled LB terms ([] tensors; one host sync)."""
        values = torch.stack([t.detach().double() for t in lb_terms_L]).tolist() if lb_terms_L else []
        if not self.lb_L:
            self.lb_L = [0.0] * len(values)
        self.lb_L = [a + b for a, b in zip(self.lb_L, values)]

    @torch.no_grad()
    def add_hidden(self, hidden_BSD: torch.Tensor, token_mask_BS: torch.Tensor) -> None:
        """Add one micro-batch's last pre-norm hidden state [B, S, D] over its real tokens [B, S]."""
        norm_BS = hidden_BSD.float().norm(dim=-1)
        mask_BS = token_mask_BS.to(norm_BS.dtype)
        self.hidden_norm_sum += float((norm_BS * mask_BS).sum())
        self.num_hidden_tokens += float(mask_BS.sum())


@dataclass
class StabilityStep:
    """What ``StabilityMonitor.end_step`` returns.

    metrics: the step's values (names in the module docstring), identical on every rank.
    ffn_per_token_stats: per layer (min, max, std) of FFN experts per real token over the whole
        global batch (all micro-batches, all dp ranks).
    router_counts_LE: [L, E + 1] the router counts passed to ``end_step`` (zeros when none were).
    Per-layer values run over every MoE layer of the model by global index (under pp > 1 gathered
    from all stages), the metric names included.
    """

    metrics: dict[str, float]
    ffn_per_token_stats: list[tuple[float, float, float]]
    router_counts_LE: torch.Tensor


@dataclass
class _PerLayer:
    """Per-layer values of one step (local layers, or under pp every layer of the model)."""

    counts_LE: torch.Tensor  # [L, E + 1] router counts over dp; last column = real tokens
    hist_LK: torch.Tensor  # [L, K + 1] FFN experts per token histogram over dp
    cos_L: list[float]  # router cosine similarity (empty: no routers given)
    ratios_L: list[float]  # R_g (empty: not a measuring step)


class StabilityMonitor:
    """R_g (Eq. 9), the automatic alpha, router cosine similarity, last-hidden norm, per-layer LB.

    Args:
        moe_cfg: ``router_health_interval``, ``auto_lb_coef``, ``rg_threshold``,
            ``router_collapse_threshold``, ``lb_loss_coef`` (the configured alpha, a ceiling).
        num_layers: MoE layers on this rank.
        pipeline_parallel: pp > 1 (the hidden norm and the per-layer LB metrics are then not logged;
            R_g is measured through ``measure_pipeline``).
        pp_group: the pipeline group (pp > 1): every stage's per-layer values (R_g, router counts,
            FFN experts per token, cosine similarity) reach every rank, so rank 0 logs every layer
            and all ranks apply the same automatic alpha.
        layer_ids: global indices of this rank's MoE layers (default ``range(num_layers)``).
        num_global_layers: MoE layers of the whole model (default ``num_layers``).
        warn: emit the collapse warning on this rank (rank 0).
    """

    def __init__(self, moe_cfg: MoEConfig, *, num_layers: int, num_experts: int, top_k: int,
                 pipeline_parallel: bool = False, pp_group: Optional[dist.ProcessGroup] = None,
                 layer_ids: Optional[Sequence[int]] = None, num_global_layers: Optional[int] = None,
                 warn: bool = True):
        self.cfg = moe_cfg
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.pipeline_parallel = pipeline_parallel
        self.pp_group = pp_group
        self.layer_ids = tuple(layer_ids) if layer_ids is not None else tuple(range(num_layers))
        assert len(self.layer_ids) == num_layers, (self.layer_ids, num_layers)
        self.num_global_layers = num_global_layers if num_global_layers is not None else num_layers
        self.warn = warn
        self.lb_coef = float(moe_cfg.lb_loss_coef)  # alpha in use
        self._measuring = False  # this step measures R_g (same decision on every rank)
        self._pending = False  # ... and the first micro-batch has not been measured yet
        self._grads_2LE: Optional[torch.Tensor] = None
        self._collapsed_L = [False] * self.num_global_layers  # by global layer index

    # ---------------------------------------------------------------- per step
    def begin_step(self, step: int) -> None:
        """Before the first micro-batch of optimizer step ``step + 1`` (``step`` steps done)."""
        interval = self.cfg.router_health_interval
        self._measuring = interval > 0 and step % interval == 0
        self._pending = self._measuring
        self._grads_2LE = None

    @property
    def wants_measurement(self) -> bool:
        """True until the first micro-batch of a measuring step has been measured."""
        return self._pending

    def measure(self, *, rest: torch.Tensor, lb_terms_L: Optional[Sequence[torch.Tensor]],
                stats: Sequence[MoEStats]) -> None:
        """Read dL/dP of the objective's two parts on this micro-batch (before its real backward).

        Args:
            rest: [] this micro-batch's share of the objective without the load-balance term.
            lb_terms_L: per layer the alpha-scaled LB term as it enters the objective; None when
                alpha is 0 (R_g is then 0).
            stats: the micro-batch's MoEStats, with ``probs_TE`` (and ``token_mask_T``).
        """
        self._pending = False
        probs_LTE = [s.probs_TE for s in stats if s.probs_TE is not None]
        if not stats or len(probs_LTE) < len(stats):  # a layer without probs_TE: nothing to measure
            return
        masks_LT = [s.token_mask_T for s in stats]
        lm = (router_health.grad_wrt_mean_probs(rest, probs_LTE, token_masks_LT=masks_LT)
              if rest.requires_grad else None)
        self._store(lm, lb_terms_L, probs_LTE, masks_LT)

    def measure_pipeline(self, *, lm_grads_LTE: Sequence[Optional[torch.Tensor]],
                         lb_terms_L: Optional[Sequence[torch.Tensor]], stats: Sequence[MoEStats]) -> None:
        """``measure`` under pipeline parallelism, from this rank's stages' part of one isolated pass
        (``PipelineRunner.run_isolated`` with ``stage(x, lm_only=True, ...)``): the LM part's
        gradient with respect to every local layer's ``probs_TE`` [T, E] (None: no dependence) came
        back through the stages' backward chain; the LB part is read here from each layer's own term.

        Args:
            lm_grads_LTE: per local layer d(LM objective)/d probs_TE, [T, E].
            lb_terms_L: per local layer the alpha-scaled LB term (graph to ``probs_TE``); None when
                alpha is 0.
            stats: the pass's MoEStats of the local layers, with ``probs_TE`` and ``token_mask_T``.
        """
        self._pending = False
        probs_LTE = [s.probs_TE for s in stats if s.probs_TE is not None]
        if not stats or len(probs_LTE) < len(stats):
            return
        masks_LT = [s.token_mask_T for s in stats]
        lm = [p.new_zeros(p.shape[-1], dtype=torch.float32) if g is None
              else (g.detach().float() * (1.0 if m is None else m.to(torch.float32)[:, None])).sum(0)
              for g, p, m in zip(lm_grads_LTE, probs_LTE, masks_LT)]
        self._store(lm, lb_terms_L, probs_LTE, masks_LT)

    def _store(self, lm_L: Optional[Sequence[torch.Tensor]], lb_terms_L: Optional[Sequence[torch.Tensor]],
               probs_LTE: Sequence[torch.Tensor], masks_LT: Sequence[Optional[torch.Tensor]]) -> None:
        """Keep [2, L, E]: the LB part (each layer's own term) and the LM part ``lm_L`` ([E] each)."""
        grads_2LE = torch.zeros(2, len(probs_LTE), probs_LTE[0].shape[-1], dtype=torch.float64)
        if lm_L is not None:
            grads_2LE[1] = torch.stack(list(lm_L)).to("cpu", torch.float64)
        if lb_terms_L is not None:
            for layer, (term, probs_TE, mask_T) in enumerate(zip(lb_terms_L, probs_LTE, masks_LT)):
                # The layer's own term only: its direct pull on P (a tiny graph: sum over tokens).
                (g_E,) = router_health.grad_wrt_mean_probs(term, [probs_TE], token_masks_LT=[mask_T])
                grads_2LE[0, layer] = g_E.to("cpu", torch.float64)
        self._grads_2LE = grads_2LE

    def end_step(self, sums: StabilitySums, stats: Sequence[Sequence[MoEStats]], *,
                 routers: Sequence[TopKRouter], dp_group: Optional[dist.ProcessGroup],
                 router_counts_LE: Optional[torch.Tensor] = None) -> StabilityStep:
        """Reduce this step's sums over dp (and the per-layer values over pp), update the automatic
        alpha; returns the step's metrics.

        Args:
            sums: this dp rank's StabilitySums of the step (before any dp reduction).
            stats: per micro-batch of this rank, per local layer its MoEStats (``ffn_per_token_T``).
            routers: this rank's ``TopKRouter`` modules, one per local MoE layer, in order.
            dp_group: the dense data-parallel group (None = no dp).
            router_counts_LE: [L_local, E + 1] the step's router counts, already summed over dp
                (``ExpertBiasController.step``); returned for every layer of the model.
        """
        L, K, E = self.num_layers, self.top_k, self.num_experts
        # FFN experts per token take the values 0..K: a histogram summed over dp gives the global
        # batch's exact min, max, mean and std with one sum all-reduce.
        hist_LK = torch.zeros(L, K + 1, dtype=torch.float64)
        for mb_stats in stats:
            for layer, s in enumerate(mb_stats):
                hist_LK[layer] += torch.bincount(s.ffn_per_token_T.detach().long().cpu(), minlength=K + 1)[:K + 1]
        lb_L = sums.lb_L if sums.lb_L else [0.0] * L
        parts = [torch.tensor(lb_L + [sums.hidden_norm_sum, sums.num_hidden_tokens], dtype=torch.float64),
                 hist_LK.reshape(-1)]
        if self._measuring:
            grads = self._grads_2LE if self._grads_2LE is not None else torch.zeros(2, L, E, dtype=torch.float64)
            parts.append(grads.reshape(-1))
        vector = torch.cat(parts)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            # [L + 2 + L(K+1) (+ 2LE when measuring)] float64 -> all_reduce(sum, dp) -> same
            dist.all_reduce(vector, group=dp_group)
        metrics: dict[str, float] = {"moe/lb_coef": self.lb_coef}
        if not self.pipeline_parallel:
            for layer in range(L):
                metrics[f"moe/layer{layer}/lb_loss"] = float(vector[layer])
            metrics["hidden/last_l2_norm"] = float(vector[L] / vector[L + 1].clamp(min=1.0))
        cos_L = [router_health.router_cosine_similarity(_full(router.classifier.weight)) for router in routers]
        ratios_L: list[float] = []
        if self._measuring:
            grads_2LE = vector[L + 2 + L * (K + 1):].reshape(2, L, E)
            ratios_L = [router_health.gradient_norm_ratio(grads_2LE[0, layer], grads_2LE[1, layer], tangent=True)
                        for layer in range(L)]
        counts_LE = router_counts_LE if router_counts_LE is not None else torch.zeros(L, E + 1, dtype=torch.float64)
        layers = self._all_stages(_PerLayer(
            counts_LE=counts_LE, hist_LK=vector[L + 2: L + 2 + L * (K + 1)].reshape(L, K + 1),
            cos_L=cos_L, ratios_L=ratios_L))
        G = layers.hist_LK.shape[0]
        ffn_stats = [_min_max_std(layers.hist_LK[layer]) for layer in range(G)]
        means = [_mean(layers.hist_LK[layer]) for layer in range(G)]
        if means:
            metrics["moe/ffn_experts_per_token"] = sum(means) / len(means)
        for layer, cos in enumerate(layers.cos_L):
            metrics[f"moe/layer{layer}/router_cosine_similarity"] = cos
            self._check_collapse(layer, cos)
        if self._measuring:
            for layer, ratio in enumerate(layers.ratios_L):
                metrics[f"moe/layer{layer}/rg"] = ratio
            metrics["moe/rg_max"] = max(layers.ratios_L, default=0.0)
            self._update_lb_coef(layers.ratios_L)
        self._measuring = self._pending = False
        self._grads_2LE = None
        return StabilityStep(metrics=metrics, ffn_per_token_stats=ffn_stats,
                             router_counts_LE=layers.counts_LE)

    # ---------------------------------------------------------------- pieces
    def _all_stages(self, local: _PerLayer) -> _PerLayer:
        """Under pp > 1 the per-layer values of every layer of the model, by global index, on every
        rank (one collective over the pipeline group); else ``local`` itself."""
        if self.pp_group is None or dist.get_world_size(self.pp_group) == 1:
            return local
        L, G = self.num_layers, self.num_global_layers
        E1, K1 = local.counts_LE.shape[1], local.hist_LK.shape[1]
        has_cos, has_rg = bool(local.cos_L), bool(local.ratios_L)
        # Columns: counts [E + 1] | histogram [K + 1] | cosine [1] | R_g [1]; the same on every stage
        # (same config, same measuring step, every rank holds its routers).
        local_LX = torch.zeros(L, E1 + K1 + 2, dtype=torch.float64)
        local_LX[:, :E1] = local.counts_LE
        local_LX[:, E1:E1 + K1] = local.hist_LK
        if has_cos:
            local_LX[:, -2] = torch.tensor(local.cos_L, dtype=torch.float64)
        if has_rg:
            local_LX[:, -1] = torch.tensor(local.ratios_L, dtype=torch.float64)
        full_GX = torch.zeros(G, E1 + K1 + 2, dtype=torch.float64)
        full_GX[list(self.layer_ids)] = local_LX
        # [G, E+1 + K+1 + 2] float64, this stage's layers filled -> all_reduce(sum, pp) -> every layer's rows
        dist.all_reduce(full_GX, group=self.pp_group)
        return _PerLayer(counts_LE=full_GX[:, :E1], hist_LK=full_GX[:, E1:E1 + K1],
                         cos_L=full_GX[:, -2].tolist() if has_cos else [],
                         ratios_L=full_GX[:, -1].tolist() if has_rg else [])

    def _update_lb_coef(self, ratios: Sequence[float]) -> None:
        ceiling = float(self.cfg.lb_loss_coef)
        if not self.cfg.auto_lb_coef or ceiling <= 0 or self.lb_coef <= 0:
            return
        at_ceiling = [r * ceiling / self.lb_coef for r in ratios]  # R_g is linear in alpha
        new = router_health.suggest_lb_coef(ceiling, at_ceiling, threshold=self.cfg.rg_threshold)
        if new != self.lb_coef:
            logger.info("moe.auto_lb_coef: alpha %.4g -> %.4g (worst R_g %.3g, threshold %.3g)",
                        self.lb_coef, new, max(ratios, default=0.0), self.cfg.rg_threshold)
        self.lb_coef = new

    def _check_collapse(self, layer: int, cos: float) -> None:
        above = cos > self.cfg.router_collapse_threshold
        if above and not self._collapsed_L[layer] and self.warn:
            logger.warning("router collapse warning: MoE layer %d's router rows have mean pairwise cosine "
                           "similarity %.3f > moe.router_collapse_threshold=%.3f", layer, cos,
                           self.cfg.router_collapse_threshold)
        self._collapsed_L[layer] = above

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"lb_coef": self.lb_coef}

    def load_state_dict(self, state: dict) -> None:
        """Restore the automatic alpha (capped at the configured one; ignored when auto is off)."""
        if self.cfg.auto_lb_coef and "lb_coef" in state:
            self.lb_coef = min(float(state["lb_coef"]), float(self.cfg.lb_loss_coef))


def _mean(hist_K: torch.Tensor) -> float:
    values = torch.arange(hist_K.numel(), dtype=torch.float64)
    return float((hist_K * values).sum() / hist_K.sum().clamp(min=1.0))


def _min_max_std(hist_K: torch.Tensor) -> tuple[float, float, float]:
    """(min, max, population std) of the values 0..K from their counts [K + 1]; zeros when empty."""
    present = torch.nonzero(hist_K > 0).flatten()
    if present.numel() == 0:
        return 0.0, 0.0, 0.0
    values = torch.arange(hist_K.numel(), dtype=torch.float64)
    mean = _mean(hist_K)
    var = float((hist_K * (values - mean) ** 2).sum() / hist_K.sum())
    return float(present[0]), float(present[-1]), var ** 0.5


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole [E, D] router weight (gathered over dp under FSDP2: a collective every rank enters)."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def local_routers(parallel: ParallelModel) -> list[TopKRouter]:
    """This rank's ``TopKRouter`` modules, one per local MoE layer, in the order of ``local_biases``."""
    return [layer.mlp.router for layer in parallel.local_layers()]
