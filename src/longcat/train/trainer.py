"""The training loop, split into named steps.

One optimizer step (docs/architecture.md):
fetch this DP rank's micro-batches -> count the global batch's labelled / real tokens over DP -> under
context parallelism, keep this cp rank's S/cp tokens of each (``cp_local_micro_batch``) -> per
micro-batch forward, losses, backward (or the pipeline schedule over all of them) -> grad sum over
dp x cp / edp -> global grad norm and clip -> optimizer -> expert-bias controller (once, global counts
over dp x cp) -> LR schedule -> metrics -> checkpoint.

The model is built and initialised identically on every rank, then ``parallelize`` keeps this rank's
pieces (PP stages, TP / EP shards, DP wrapping): every layout starts from the single-process weights.

Shapes: B micro-batch size, S sequence length, V vocabulary (V/tp under TP), L MoE layers (local to
this rank; in ``StepResult`` and the metrics every layer of the model, by global index), E = N + Z experts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from longcat.atomic_files import write_text_atomic
from longcat.config.schema import ResumeMode, RunConfig, num_grad_accum_steps
from longcat.data import build_pretrain_data
from longcat.distributed.context_parallel import cp_local_positions, cp_split
from longcat.distributed.groups import ProcessGroups
from longcat.model import LongcatFlashForCausalLM, init_weights
from longcat.model.moe import AllToAllTokenDispatcher, MoE
from longcat.model.parallel.parallelize import parallelize
from longcat.train import losses
from longcat.train.bias_controller import ExpertBiasController
from longcat.train.callbacks import Callback, FitState, fit_callbacks
from longcat.train.checkpoint import CheckpointManager, latest_checkpoint
from longcat.train.determinism import enable_determinism, seed_rank_streams
from longcat.train.metrics import MetricsSink
from longcat.train.nonfinite import NonFiniteGuard
from longcat.train.objective import TrainingObjective
from longcat.train.optim import build_optimizer, width_scale
from longcat.train.schedule import build_scheduler, lr_multiplier
from longcat.train.sdc_check import SDCMonitor, SDCRollback, rollback_to_good_checkpoint
from longcat.train.stability import StabilityMonitor, StabilitySums, local_routers
from longcat.train.throughput import ThroughputMeter, max_memory_bytes, peak_tflops_per_device

logger = logging.getLogger(__name__)


@dataclass
class LossParts:
    """Detached loss components of one optimizer step, already normalised (summed over micro-batches)."""

    ce: float = 0.0
    mtp: float = 0.0
    z: float = 0.0
    lb: float = 0.0
    stability: StabilitySums = field(default_factory=StabilitySums)  # this dp rank's, per layer LB etc.

    @property
    def total(self) -> float:
        return self.ce + self.mtp + self.z + self.lb


@dataclass
class StepResult:
    step: int
    loss: LossParts
    grad_norm: float
    lr: float
    num_tokens: float
    # Per MoE layer of the model (global index; under PP gathered from every stage):
    router_counts_LE: torch.Tensor  # [L, E + 1] global-batch counts; last column = real tokens
    ffn_per_token_stats: list = field(default_factory=list)  # per layer (min, max, std) over the global batch
    ep_rows: Optional[dict] = None  # under EP, all-to-all rows of the step summed over all ranks
    stability: dict = field(default_factory=dict)  # StabilityMonitor metrics (R_g, cosine, hidden norm, ...)


class Trainer:
    """Builds everything a run needs from a validated ``RunConfig`` and trains it.

    Args:
        cfg: the resolved run config, validated for this run's world size (``longcat.config.validate``).
        groups: the run's ``ProcessGroups`` (``None`` = single process).
        config_dict: the plain-dict config stored in checkpoints and wandb.
        callbacks: added to ``fit``'s own (``train/callbacks.py``) and told of every checkpoint save
            phase (the reliability tests inject faults this way); none in production runs.

    Raises:
        ValueError: the layout is not supported (see ``parallelize``), or bad data / checkpoint files.
    """

    def __init__(self, cfg: RunConfig, *, groups: Optional[ProcessGroups] = None, config_dict: Optional[dict] = None,
                 callbacks: Sequence[Callback] = ()):
        self.cfg = cfg
        self.groups = groups if groups is not None else ProcessGroups.single()
        self.dp_size, self.dp_rank = self.groups.dp_size, self.groups.dp_rank
        self.dp_group = self.groups.dp_group if self.dp_size > 1 else None
        self.cp_size = self.groups.cp_size
        # The ranks whose tokens make up one step of this model replica: dp x cp. Token sums (losses,
        # router counts, statistics) reduce over it; the global token counts over dp (computed on the
        # whole micro-batches, before the cp split).
        self.batch_group = self.groups.dp_cp_group if self.dp_size * self.cp_size > 1 else None
        self.is_rank0 = self.groups.rank == 0
        self.config_dict = config_dict or {}
        self.extra_callbacks = tuple(callbacks)
        self.device = torch.device(cfg.train.device)
        self.out_dir = Path(cfg.train.out_dir)
        self.accum = num_grad_accum_steps(cfg, dp=self.dp_size)

        if cfg.determinism.enabled:
            enable_determinism()  # idempotent; launch.run_training already did, before CUDA / NCCL start
        torch.manual_seed(cfg.train.seed)
        model = LongcatFlashForCausalLM(cfg.model, activation_checkpointing=cfg.train.activation_checkpointing)
        model = model.to(self.device)
        init_weights(model, cfg.model, width_scale=width_scale(cfg.model, cfg.optim))
        if cfg.determinism.enabled:  # init drew the same numbers on every rank; from here each rank its own
            seed_rank_streams(cfg.train.seed, rank=self.groups.rank)
        # One objective for the plain step and the pipeline stages; alpha is the stability monitor's
        # (automatic under moe.auto_lb_coef), read at every micro-batch.
        self.objective = TrainingObjective(
            loss_cfg=cfg.loss, moe_cfg=cfg.moe, model_cfg=cfg.model, num_microbatches=self.accum,
            dp_size=self.dp_size, ep_size=self.groups.ep_size, tp_group=self.groups.tp_group,
            cp_group=self.groups.cp_group if self.cp_size > 1 else None,
            autocast_dtype=torch.bfloat16 if cfg.train.bf16 else None, lb_coef=lambda: self.stability.lb_coef)
        self.parallel = parallelize(model, groups=self.groups, options=cfg.parallel,
                                    num_microbatches=self.accum, objective=self.objective,
                                    compile_dense=cfg.train.compile)
        self.model = self.parallel.model
        self.pipeline = self.parallel.pipeline
        self.optimizer = build_optimizer(self.parallel.model, optim_cfg=cfg.optim, model_cfg=cfg.model)
        self.parallel.attach_optimizer(self.optimizer, clip_grad=cfg.optim.clip_grad)
        self.scheduler = build_scheduler(self.optimizer, cfg=cfg.optim, total_steps=cfg.train.steps)
        self.biases_L = self.parallel.local_biases()
        self.sdc = SDCMonitor(cfg.sdc, parallel=self.parallel, groups=self.groups,
                              checkpoint_root=self.out_dir / "checkpoints")
        self.guard = NonFiniteGuard(cfg.train.nonfinite_policy, world_group=self.groups.world_group)
        self.throughput = ThroughputMeter(
            cfg.model, global_batch_size=cfg.data.global_batch_size, seq_length=cfg.data.seq_length,
            world_size=self.groups.dims.world_size,
            peak_tflops=peak_tflops_per_device(cfg.logging.peak_tflops, device=self.device, bf16=cfg.train.bf16))
        self._ep_dispatchers = [m.dispatcher for m in self.model.modules()
                                if isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllTokenDispatcher)]
        self.controller = ExpertBiasController(cfg.moe, cfg.model, num_layers=len(self.biases_L),
                                               total_steps=cfg.train.steps)
        self.stability = StabilityMonitor(
            cfg.moe, num_layers=len(self.biases_L), num_experts=cfg.model.num_experts_total, top_k=cfg.model.moe_topk,
            pipeline_parallel=self.pipeline is not None, warn=self.is_rank0,
            pp_group=self.groups.pp_group if self.pipeline is not None else None,
            layer_ids=self.pipeline.local_layer_ids if self.pipeline is not None else None,
            num_global_layers=cfg.model.num_layers)
        self.routers_L = local_routers(self.parallel)
        self.data = build_pretrain_data(cfg.data, vocab_size=cfg.model.vocab_size,
                                        dp_rank=self.dp_rank, dp_size=self.dp_size)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep_last=cfg.train.keep_last,
                                             group=self.groups.world_group, rank=self.groups.rank,
                                             observers=self.extra_callbacks)
        self.step = 0
        self.tokens_seen = 0.0
        self._restore()
        self.train_iter = iter(self.data.train)

    # ----------------------------------------------------------------------------- state
    # A new stage (train.init_from) may change these: the long-context stage raises the RoPE base and
    # the position limit (arXiv 2509.01322 §3); no weight depends on them.
    STAGE_CHANGEABLE = ("rope_theta", "max_position_embeddings")

    def _check_model_config(self, saved: dict, *, new_stage: bool = False) -> None:
        saved_model = saved.get("model") if isinstance(saved, dict) else None
        if not saved_model:
            return
        current = asdict(self.cfg.model)
        diffs = [f"{k}: checkpoint {saved_model.get(k)!r} != run {v!r}"
                 for k, v in current.items() if k in saved_model and saved_model[k] != v
                 and not (new_stage and k in self.STAGE_CHANGEABLE)]
        if diffs:
            raise ValueError("the checkpoint was trained with a different model config (" + "; ".join(diffs)
                             + "); load it with the same model.* settings or start a new out_dir")

    def _restore(self) -> None:
        cfg = self.cfg.train
        latest = latest_checkpoint(self.checkpoints.root)
        if ResumeMode(cfg.resume) is ResumeMode.none and latest is not None:
            raise ValueError(f"train.resume=none but {latest} exists; use train.resume=auto to continue "
                             "or choose a fresh train.out_dir")
        if latest is not None:
            self.load_checkpoint(latest)
            self.sdc.after_resume(step=self.step)  # with SDC checks on: replicas compared after the first step
            logger.info("resumed from %s at step %d", latest, self.step)
        elif cfg.init_from:
            self.checkpoints.load(Path(cfg.init_from), model=self.parallel, optimizer=None,
                                  check_config=lambda saved: self._check_model_config(saved, new_stage=True))
            if self.pipeline is not None:
                self.pipeline.sync_tied_embedding_weights()
            logger.info("initialised weights from %s", cfg.init_from)

    def load_checkpoint(self, path: Path) -> None:
        """Put the whole training state (weights, optimizer, step, LR schedule, controller, data position)
        at checkpoint ``path``: a resume, or an SDC rollback."""
        state = self.checkpoints.load(path, model=self.parallel, optimizer=self.optimizer,
                                      check_config=self._check_model_config)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self._set_schedule_step(state.get("scheduler", {}).get("last_epoch", self.step))
        self.controller.load_state_dict(state["controller"])
        self.controller.discard()
        self.stability.load_state_dict(state.get("stability", {}))
        self.data.train.load_state_dict(state["data"])
        self.train_iter = iter(self.data.train)

    def _set_schedule_step(self, last_epoch: int) -> None:
        """Put the LR schedule at ``last_epoch`` steps (layout-independent: no per-group state)."""
        self.scheduler.last_epoch = last_epoch
        mult = lr_multiplier(last_epoch, cfg=self.cfg.optim, total_steps=self.cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * mult
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": {"last_epoch": self.scheduler.last_epoch},
            "controller": self.controller.state_dict(),
            "stability": self.stability.state_dict(),
            "data": self.data.train.state_dict(),
            "config": self.config_dict,
        }

    def save_checkpoint(self) -> Optional[Path]:
        """Write the checkpoint of this step; with SDC checks on, only from agreeing replicas
        (``SDCMonitor.before_checkpoint``). Returns its folder, or None when ``sdc.policy=warn`` found the
        replicas disagreeing (nothing written).

        Raises:
            SDCHaltError / SDCRollback: the replicas disagree under ``sdc.policy=halt`` / ``rollback``.
        """
        if not self.sdc.before_checkpoint(step=self.step):
            logger.error("checkpoint of step %d not written: the replicas disagree (see the SDC report above)",
                         self.step)
            return None
        return self.checkpoints.save(self.step, model=self.parallel, optimizer=self.optimizer,
                                     trainer_state=self.trainer_state())

    # ----------------------------------------------------------------------------- step
    def _global_counts(self, micro_batches: list[dict]) -> losses.GlobalTokenCounts:
        """Token counts of the global batch from this dp rank's whole micro-batches (before any cp split).
        TP, PP and CP ranks hold the same micro-batches: sum over dp only."""
        counts = torch.zeros(3, dtype=torch.float64)
        for mb in micro_batches:
            labels_BS = mb["labels"]
            counts[0] += (labels_BS != losses.IGNORE_INDEX).sum()
            counts[1] += (losses.mtp_labels(labels_BS) != losses.IGNORE_INDEX).sum()
            counts[2] += mb["token_mask"].sum()
        if self.dp_group is not None:
            # [3] float64 -> all_reduce(sum, dp) -> [3]
            dist.all_reduce(counts, group=self.dp_group)
        return losses.GlobalTokenCounts(*(max(float(c), 1.0) for c in counts))

    def cp_local_micro_batch(self, mb: dict) -> dict:
        """This cp rank's share of a whole micro-batch (the micro-batch itself without CP).

        [B, S] input_ids / labels / token_mask -> [B, S/cp] (chunks r and 2cp-1-r,
        ``distributed.context_parallel``), plus [B, S/cp] ``position_ids`` (the global positions),
        ``mtp_labels`` and ``mtp_input_ids`` (the MTP head's labels and next-token ids, shifted on the
        global sequence first: a chunk's last token's successor lives on another rank).
        """
        if self.cp_size == 1:
            return mb
        r, cp = self.groups.cp_rank, self.cp_size
        input_ids_BS, labels_BS = mb["input_ids"], mb["labels"]
        B, S = input_ids_BS.shape
        global_BS = {"input_ids": input_ids_BS, "labels": labels_BS, "token_mask": mb["token_mask"],
                     "mtp_labels": losses.mtp_labels(labels_BS), "mtp_input_ids": torch.roll(input_ids_BS, -1, dims=1)}
        local = {k: cp_split(v, cp_rank=r, cp=cp) for k, v in global_BS.items()}
        local["position_ids"] = cp_local_positions(S, cp_rank=r, cp=cp).expand(B, S // cp).contiguous()
        return local

    def forward_backward(self, mb: dict, counts: losses.GlobalTokenCounts, parts: LossParts) -> list:
        """Forward one micro-batch (this cp rank's share under CP: ``cp_local_micro_batch``), backward
        its share of the global objective; returns its MoE stats."""
        objective, stats = self.forward_objective(mb, counts, parts)
        self.parallel.backward(objective)
        return stats

    def forward_objective(self, mb: dict, counts: losses.GlobalTokenCounts,
                          parts: LossParts) -> tuple[torch.Tensor, list]:
        """Forward one micro-batch: (its share of the global objective, fp32 [] with grad; its MoE stats
        without the probabilities); its loss parts added to ``parts``."""
        input_ids_BS = mb["input_ids"].to(self.device)
        labels_BS = mb["labels"].to(self.device)
        token_mask_BS = mb["token_mask"].to(self.device)
        position_ids_BS = mb["position_ids"].to(self.device) if "position_ids" in mb else None
        mtp_labels_BS = mb["mtp_labels"].to(self.device) if "mtp_labels" in mb else None
        head_labels = self._head_labels(labels_BS, mtp_labels_BS)
        with self.objective.autocast(self.device):
            out = self.model(input_ids_BS, token_mask_BS=token_mask_BS, position_ids_BS=position_ids_BS, **head_labels)
        lm = self.objective.lm_terms(
            logits_BSV=out.logits_BSV, mtp_logits_BSV=out.mtp_logits_BSV, last_hidden_BSD=out.last_hidden_BSD,
            labels_BS=labels_BS, token_mask_BS=token_mask_BS, counts=counts, vocab_parallel=out.logits_vocab_parallel,
            mtp_labels_BS=mtp_labels_BS, ce_sum=out.ce_sum, mtp_ce_sum=out.mtp_ce_sum)
        objective = lm.total
        parts.ce += lm.ce.item()
        if lm.mtp is not None:
            parts.mtp += lm.mtp.item()
        if lm.z is not None:
            parts.z += lm.z.item()
        lb, lb_terms_L = None, None
        lb_terms = self.objective.load_balance(out.moe_stats)  # None when alpha is 0
        if lb_terms is not None:
            lb, lb_terms_L = lb_terms.total(), lb_terms.per_layer()
            parts.stability.add_lb(lb_terms_L)
        if self.stability.wants_measurement:  # R_g (Eq. 9) before the real backward; see train/stability.py
            self.stability.measure(rest=objective, lb_terms_L=lb_terms_L, stats=out.moe_stats)
        if lb is not None:
            objective = objective + lb
            parts.lb += lb.item()
        parts.stability.add_hidden(out.last_hidden_BSD, token_mask_BS)
        return objective, [dataclasses.replace(s, probs_TE=None, token_mask_T=None) for s in out.moe_stats]

    def _head_labels(self, labels_BS: torch.Tensor, mtp_labels_BS: Optional[torch.Tensor] = None,
                     *, with_mtp: bool = True) -> dict[str, torch.Tensor]:
        """The model's label keywords: none for the logits path; with the fused head (``loss.lm_head_ce``)
        ``labels_BS`` and, when the MTP loss is on, the MTP head's labels."""
        if not self.objective.fused_head:
            return {}
        head_labels = {"labels_BS": labels_BS}
        if with_mtp and self.objective.wants_mtp:
            head_labels["mtp_labels_BS"] = self.objective.mtp_labels_for(labels_BS, mtp_labels_BS)
        return head_labels

    def _forward_backward_all(self, micro_batches: list[dict], counts: losses.GlobalTokenCounts):
        """Every micro-batch of this rank: (LossParts of this dp rank, per micro-batch the local layers' stats)."""
        if self.pipeline is not None:
            if self.stability.wants_measurement:  # R_g (Eq. 9) under PP: one isolated LM-only pass
                self._measure_rg_pipeline(micro_batches[0], counts)
            if self.sdc.replay_due(self.step + 1):  # SDC replay per stage (train/sdc_check.py)
                out = self.sdc.replay_pipeline(self.pipeline, micro_batches, counts, step=self.step + 1)
            else:
                out = self.pipeline.step(micro_batches, counts)
            ce, mtp, z, lb = out.loss_sums  # TrainingObjective.TERM_NAMES
            return LossParts(ce=ce, mtp=mtp, z=z, lb=lb), out.per_microbatch
        parts, stats = LossParts(), []
        if self.sdc.replay_due(self.step + 1) and self.parallel.deepspeed is not None:  # its engine owns the grads
            return parts, self.sdc.forward_backward_replayed_functional(
                micro_batches, step=self.step + 1, forward=lambda mb, p: self.forward_objective(mb, counts, p),
                backward=self.parallel.backward, parts=parts)
        if self.sdc.replay_due(self.step + 1):  # SDC replay of one micro-batch (train/sdc_check.py)
            return parts, self.sdc.forward_backward_replayed(
                micro_batches, step=self.step + 1, run=lambda mb, p: self.forward_backward(mb, counts, p), parts=parts)
        for mb in micro_batches:
            stats.append(self.forward_backward(mb, counts, parts))
        return parts, stats

    def _measure_rg_pipeline(self, mb: dict, counts: losses.GlobalTokenCounts) -> None:
        """R_g's gradients under PP (train/stability.py): the first micro-batch through every stage on
        its own with the LM part of the objective only (``forward_lm_only``), its gradient at each
        stage's routers brought back by the stages' backward chain (no parameter gradients); the LB
        part from each local layer's own term, as the plain step does."""
        assert self.pipeline is not None
        results = self.pipeline.run_isolated(mb, counts, stage_fn=lambda stage, x, kw: stage(x, lm_only=True, **kw))
        stats = [s for r in results for s in r.report]
        lm_grads = [g for r in results for g in r.watched_grads]
        lb_terms = self.objective.load_balance(stats)
        self.stability.measure_pipeline(lm_grads_LTE=lm_grads, lb_terms_L=lb_terms.per_layer() if lb_terms else None,
                                        stats=stats)

    def train_step(self, micro_batches: Optional[list[dict]] = None) -> StepResult:
        """One optimizer step on ``micro_batches`` (this dp rank's share; default: the next from the data)."""
        if micro_batches is None:
            micro_batches = [next(self.train_iter) for _ in range(self.accum)]
        counts = self._global_counts(micro_batches)
        micro_batches = [self.cp_local_micro_batch(mb) for mb in micro_batches]
        self.stability.begin_step(self.step)
        for d in self._ep_dispatchers:
            d.reset_counters()
        self.parallel.zero_grad(self.optimizer)
        parts, stats = self._forward_backward_all(micro_batches, counts)
        for mb_stats in stats:
            self.controller.accumulate([s.expert_counts_E for s in mb_stats], [s.num_tokens for s in mb_stats])
        lr = self.optimizer.param_groups[0]["lr"]
        skip_if = functools.partial(self.guard.should_skip, loss=parts.total, step=self.step + 1,
                                    skippable=self.parallel.deepspeed is None)
        grad_norm = self.parallel.reduce_clip_step(self.optimizer, max_norm=self.cfg.optim.clip_grad, skip_if=skip_if)
        if self.guard.skipped_last:  # non-finite: nothing applied, the step's router counts dropped too
            router_counts_LE = self.controller.discard()
        else:
            router_counts_LE = self.controller.step(self.biases_L, dp_group=self.batch_group)
        if self.cp_size > 1:  # each cp rank holds the micro-batch's whole LB terms (statistics summed over cp)
            parts.lb /= self.cp_size
            parts.stability.lb_L = [x / self.cp_size for x in parts.stability.lb_L]
        stability = self.stability.end_step(parts.stability, stats, routers=self.routers_L, dp_group=self.batch_group,
                                            router_counts_LE=router_counts_LE)
        if not self.guard.skipped_last:
            self.scheduler.step()
        self.sdc.after_optimizer(step=self.step + 1)  # parameter fault injection, cross-replica check
        self.step += 1
        self.tokens_seen += counts.num_real
        if self.batch_group is not None:
            totals = torch.tensor([parts.ce, parts.mtp, parts.z, parts.lb], dtype=torch.float64)
            dist.all_reduce(totals, group=self.batch_group)  # [4] -> all_reduce(sum, dp x cp) -> [4]
            parts = LossParts(*totals.tolist())
        return StepResult(step=self.step, loss=parts, grad_norm=grad_norm, lr=lr,
                          num_tokens=counts.num_real, router_counts_LE=stability.router_counts_LE,
                          ffn_per_token_stats=stability.ffn_per_token_stats, ep_rows=self._ep_rows(),
                          stability=stability.metrics)

    def _ep_rows(self) -> Optional[dict]:
        """Rows the EP dispatchers sent this step (all ranks): zero-expert rows must stay 0."""
        if not self._ep_dispatchers:
            return None
        rows_2 = torch.zeros(2, dtype=torch.float64)
        for d in self._ep_dispatchers:
            c = d.counters()
            rows_2 += torch.tensor([c.dispatched_rows, c.zero_expert_rows_sent], dtype=torch.float64)
        if self.groups.world_size > 1:
            dist.all_reduce(rows_2, group=self.groups.world_group)  # [2] -> all_reduce(sum, world) -> [2]
        return {"ep/dispatched_rows": float(rows_2[0]), "ep/zero_expert_rows_sent": float(rows_2[1])}

    # ----------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted validation cross-entropy over ``train.eval_batches`` fixed micro-batches."""
        self.parallel.train(False)
        batches = self.data.valid_batches(self.cfg.train.eval_batches, self.cfg.data.micro_batch_size)
        batches = [self.cp_local_micro_batch(mb) for mb in batches]
        total = torch.zeros(2, dtype=torch.float64)
        if self.pipeline is not None:
            total += torch.tensor(self.pipeline.eval_loss(batches), dtype=torch.float64)
        else:
            for mb in batches:
                position_ids_BS = mb["position_ids"].to(self.device) if "position_ids" in mb else None
                labels_BS = mb["labels"].to(self.device)
                with self.objective.autocast(self.device):
                    out = self.model(mb["input_ids"].to(self.device), token_mask_BS=mb["token_mask"].to(self.device),
                                     position_ids_BS=position_ids_BS,
                                     **self._head_labels(labels_BS, with_mtp=False))
                total += self.objective.eval_sums(out.logits_BSV, labels_BS, vocab_parallel=out.logits_vocab_parallel,
                                                  ce_sum=out.ce_sum).cpu()
        if self.batch_group is not None:
            dist.all_reduce(total, group=self.batch_group)  # [2] -> all_reduce(sum, dp x cp) -> [2]
        self.parallel.train(True)
        return float(total[0] / total[1].clamp(min=1))
    # ----------------------------------------------------------------------------- loop
    def step_metrics(self, result: StepResult, elapsed_s: float) -> dict[str, Any]:
        n = self.cfg.model.n_routed_experts
        metrics: dict[str, Any] = {
            "loss": result.loss.total, "loss/ce": result.loss.ce, "loss/mtp": result.loss.mtp,
            "loss/z": result.loss.z, "loss/lb": result.loss.lb, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens_per_s": result.num_tokens / max(elapsed_s, 1e-9), "tokens_seen": self.tokens_seen,
            "step_time_s": elapsed_s,
        }
        if result.ep_rows:
            metrics.update(result.ep_rows)
        counts_LE = result.router_counts_LE
        for layer in range(counts_LE.shape[0]):
            tokens = counts_LE[layer, -1].clamp(min=1)
            load_N = counts_LE[layer, :n]
            lo, hi, std = result.ffn_per_token_stats[layer]
            metrics[f"moe/layer{layer}/ffn_experts_per_token"] = float(load_N.sum() / tokens)
            metrics[f"moe/layer{layer}/ffn_experts_per_token_min"] = lo
            metrics[f"moe/layer{layer}/ffn_experts_per_token_max"] = hi
            metrics[f"moe/layer{layer}/ffn_experts_per_token_std"] = std
            metrics[f"moe/layer{layer}/zero_expert_share"] = float(
                counts_LE[layer, n:-1].sum() / counts_LE[layer, :-1].sum().clamp(min=1))
            metrics[f"moe/layer{layer}/load_max_over_mean"] = float(load_N.max() / load_N.mean().clamp(min=1e-9))
            metrics[f"moe/layer{layer}/expert_load"] = (load_N / tokens).tolist()
        metrics.update(result.stability)
        ffn_per_token = [metrics[f"moe/layer{layer}/ffn_experts_per_token"] for layer in range(counts_LE.shape[0])]
        metrics.update(self.throughput.metrics(
            elapsed_s=elapsed_s, ffn_experts_per_token=sum(ffn_per_token) / max(len(ffn_per_token), 1)))
        metrics["memory/max_gb"] = self._max_memory_bytes() / 1e9
        metrics.update(self.sdc.metrics())
        metrics["nonfinite/skipped_steps"] = self.guard.num_skipped
        return metrics

    def _max_memory_bytes(self) -> float:
        """The largest peak memory of any rank (CUDA allocator peak, or peak RSS on CPU), bytes."""
        peak = torch.tensor([float(max_memory_bytes(self.device))], dtype=torch.float64)
        if self.groups.dims.world_size > 1:
            # [1] float64 -> all_reduce(max, world) -> [1]
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.groups.world_group)
        return float(peak[0])

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``: each optimizer step, then the callbacks in their fixed order
        (``train/callbacks.py``: Evaluate, LogMetrics, Checkpoint, the extra callbacks, Preemption).

        Returns a summary: start / final step, initial / final validation loss, the last checkpoint,
        the preemption step if stopped early, the metrics file and the wandb folder.
        """
        state = self._start_fit()
        callbacks = fit_callbacks(self.cfg, extra=self.extra_callbacks)
        try:
            for callback in callbacks:
                callback.setup(self, state)
            for callback in callbacks:
                callback.on_train_start(self, state)
            self.parallel.train(True)
            while self.step < self.cfg.train.steps and not state.stop:
                if self._train_step_or_rollback(state):
                    try:
                        for callback in callbacks:
                            callback.on_step_end(self, state)
                    except SDCRollback as request:  # the replicas disagreed right before a checkpoint
                        self._rollback(request, state)
            state.summary["final_step"] = self.step
            state.summary["metrics_file"] = str(state.sink.jsonl_path)
            state.summary["wandb_dir"] = str(state.sink.wandb_dir) if state.sink.wandb_dir else None
        finally:
            for callback in callbacks:
                callback.teardown(self, state)
            state.sink.close()
        return state.summary

    def _start_fit(self) -> FitState:
        """Open the metrics sink (a resumed run drops the records past its step), write config.json."""
        cfg = self.cfg.train
        sink = MetricsSink(self.cfg.logging, out_dir=self.out_dir, total_steps=cfg.steps,
                           start_step=self.step, enabled=self.is_rank0, run_config=self.config_dict)
        if self.step >= cfg.steps:
            logger.warning("already at step %d >= train.steps=%d: nothing to train (raise train.steps to "
                           "continue this run, or use a new train.out_dir)", self.step, cfg.steps)
        if self.is_rank0:
            write_text_atomic(self.out_dir / "config.json", json.dumps(self.config_dict, indent=1, default=str))
        return FitState(sink=sink, summary={"start_step": self.step})

    def _train_step_or_rollback(self, state: FitState) -> bool:
        """One optimizer step and its metrics record (``state.metrics``); False when an SDC check asked
        for a rollback instead: every rank reloaded the last good checkpoint and metrics.jsonl was
        rewound to it (train/sdc_check.py), so the loop trains on from there."""
        start = time.perf_counter()
        try:
            result = self.train_step()
        except SDCRollback as request:
            self._rollback(request, state)
            return False
        state.metrics = self.step_metrics(result, time.perf_counter() - start)
        return True

    def _rollback(self, request: SDCRollback, state: FitState) -> None:
        """Every rank reloads the last good checkpoint; metrics.jsonl is rewound to it."""
        rollback_to_good_checkpoint(self, request)
        state.sink.rewind(self.step)
