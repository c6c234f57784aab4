"""The trainer's SDC checks: replay, cross-replica hashes, the mismatch policy and rollback.

Steps are numbered from 1 (``StepResult.step``; ``sdc.inject.step`` uses the same numbers). On a step
``s`` with ``s % sdc.replay_interval == 0`` (arXiv 2509.01322 §5.1, ``train/sdc.py``):

    micro-batches 0 .. m-1           normal forward + backward, grads accumulate
    micro-batch m (the chosen one)   grads so far stashed -> forward + backward in isolation
                                     -> [fault injection] -> checksums of its loss parts and every grad
                                     -> stashed grads added back (old + new: the bits autograd's own
                                        accumulation gives, so a replayed step trains exactly as any)
    micro-batches m+1 .. A-1         normal
    replay                           all grads stashed -> micro-batch m again -> checksums -> compared
                                     bit for bit -> replay grads dropped, stash put back

The replay therefore costs one micro-batch's forward and backward plus two checksum passes over the
gradients; every rank replays at the same step, so the collectives of TP / EP pair up. The MoE
statistics of the replay are dropped; EP dispatch counters include its rows.

Under DeepSpeed (``forward_backward_replayed_functional``) the engine takes each backward's
gradients into its own ZeRO buffers, so they cannot be stashed: the chosen micro-batch's training
forward is the first computation, its gradient is taken once more with ``torch.autograd.grad``
(no accumulate-grad hook runs, the engine sees nothing) before the engine's backward trains on it,
and the replay (forward + ``torch.autograd.grad``) is compared with it. Extra cost: one backward more
than the plain replay.

Under pipeline parallelism (``replay_pipeline``) the schedule interleaves micro-batches over the
stages and accumulates their gradients, so nothing in it is one micro-batch's alone. After the
schedule's step the chosen micro-batch runs twice on its own through the stages
(``PipelineRunner.run_isolated``: every stage's training forward in stage order, then the backward
in reverse, activations and their gradients sent point to point), the trainer's gradients stashed
meanwhile; the first run takes the fault injection, the second is the replay. Per stage the
checksums of its output, loss terms, input-activation gradient and parameter gradients are compared
(``stage{s}/output``, ``stage{s}/loss``, ``stage{s}/input_grad``, parameter names), and the first
run's stage outputs against those the schedule itself computed for that micro-batch
(``stage{s}/output@schedule``). Extra cost: two micro-batches' forward and backward, stage after
stage (no overlap between stages). Under FSDP2 each isolated run goes through the stage roots' hooks:
the weights are gathered again and the run's gradients are reduce-scattered over dp into the
(stashed) sharded ``.grad``, so a fault on one dp rank shows in the reduced gradients of every dp
rank of its stage, and a fault flipped into a gradient lands in this rank's shard.

On a step with ``s % sdc.replica_interval == 0``, after the optimizer step, parameters replicated
over dp (dense; and the expert biases) and over edp (routed experts) are hashed and compared across
the replicas (``cross_replica_mismatches``); parameters FSDP shards over dp are not replicated and
not compared.

A mismatch on any rank reaches every rank (count all-reduced over the world group, reports
all-gathered), is logged on every rank (step, rank, tensor, both checksums), counted
(``sdc/mismatches``, ``sdc/failed_checks``) and acted on by ``sdc.policy``: ``warn`` continues;
``halt`` raises ``SDCHaltError`` on every rank before the suspect state is applied or saved
(``launch`` exits with code 3); ``rollback`` raises ``SDCRollback``, which ``Trainer.fit`` answers
with ``rollback_to_good_checkpoint``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from longcat.config.schema import FaultInjection, SDCConfig, SDCPolicy
from longcat.distributed.groups import ProcessGroups
from longcat.distributed.pipeline import PipelineRunner, PipelineStepOutput, StagePassOutput
from longcat.model.parallel.parallelize import ParallelModel
from longcat.train.checkpoint import CheckpointManager, list_checkpoints
from longcat.train.sdc import (
    FaultInjector,
    Mismatch,
    checksums,
    compare_checksums,
    cross_replica_mismatches,
)

logger = logging.getLogger(__name__)

SDC_EXIT_CODE = 3
_MAX_LOGGED = 20  # report lines per failed check (an activation fault touches most gradients)


class SDCHaltError(RuntimeError):
    """Silent data corruption detected under ``sdc.policy=halt`` (or no good checkpoint to roll back
    to); raised on every rank. ``mismatches`` holds every rank's reports."""

    exit_code = SDC_EXIT_CODE

    def __init__(self, message: str, mismatches: Sequence[Mismatch] = ()):
        super().__init__(message)
        self.mismatches = list(mismatches)


class SDCRollback(Exception):
    """Raised on every rank under ``sdc.policy=rollback``: reload a checkpoint of step <= ``max_step``."""

    def __init__(self, *, step: int, max_step: int, mismatches: Sequence[Mismatch]):
        super().__init__(f"SDC at step {step}: rolling back to a checkpoint of step <= {max_step}")
        self.step = step
        self.max_step = max_step
        self.mismatches = list(mismatches)


@dataclass
class _ReplicaSet:
    """Tensors every rank of ``group`` holds an identical copy of."""

    group: dist.ProcessGroup
    named: list[tuple[str, torch.Tensor]]


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else group.size()


def _training_forward(stage: Any, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> StagePassOutput:
    """A stage's training forward (``StageModule.forward``) as a ``run_isolated`` stage function."""
    return StagePassOutput(output=stage(x, **inputs))


def _floats(value: Any) -> list[float]:
    """Every int / float in a nest of dicts and lists (``dataclasses.asdict`` of loss parts), in order."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _floats(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _floats(v)]
    return [float(value)] if isinstance(value, (int, float)) else []


class SDCMonitor:
    """Runs the replay and cross-replica checks of ``sdc.*`` for one trainer.

    Args:
        cfg: ``RunConfig.sdc``.
        parallel: the trainer's ``ParallelModel`` (its placements name every local parameter).
        groups: the run's ``ProcessGroups``.
        checkpoint_root: the run's checkpoint folder; on ``halt`` after a replica mismatch the
            checkpoints written since the last clean replica check are set aside (``.suspect``).

    Attributes:
        injector: the armed ``FaultInjector`` (``sdc.inject``), or None; tests re-arm it with ``arm``.
        mismatches: every reported mismatch so far (all ranks'), in detection order.
        num_checks: checks run, by kind (``replay``, ``replica``).
        num_failed_checks: checks that found at least one mismatch.

    ``cfg`` passed ``SDCConfig.validate`` (``longcat.config.validate``).
    """

    def __init__(self, cfg: SDCConfig, *, parallel: ParallelModel, groups: ProcessGroups,
                 checkpoint_root: Optional[Path] = None):
        self.cfg = cfg
        self.policy = SDCPolicy(cfg.policy)
        self.parallel = parallel
        self.groups = groups
        self.rank = groups.rank
        self.world_group = groups.world_group
        self.checkpoint_root = checkpoint_root
        self.injector: Optional[FaultInjector] = None
        if cfg.inject.step >= 0:
            self.arm(cfg.inject)
        self.mismatches: list[Mismatch] = []
        self.num_checks = {"replay": 0, "replica": 0}
        self.num_failed_checks = 0
        self.last_replica_clean_step = 0
        self._rolled_back_from: Optional[int] = None
        self._first: dict[str, int] = {}
        self._replica_sets = self._build_replica_sets() if self.enabled else []
        self._replicas_checked_at: Optional[int] = None  # the step whose parameters were last compared
        self._replica_check_forced_at: Optional[int] = None  # the first step after a resume

    @property
    def enabled(self) -> bool:
        """Any SDC check on: then replicas are also compared before each checkpoint and after a resume."""
        return bool(self.cfg.replay_interval or self.cfg.replica_interval)

    # ------------------------------------------------------------------------- setup
    def arm(self, fault: FaultInjection) -> None:
        """Arm a (new) single-bit fault: ``fault.step``, ``fault.rank``, ``fault.target``..."""
        self.injector = FaultInjector(fault, rank=self.rank)

    def _build_replica_sets(self) -> list[_ReplicaSet]:
        dense: list[tuple[str, torch.Tensor]] = []
        expert: list[tuple[str, torch.Tensor]] = []
        dims = self.groups.dims
        # the non-trivial dims of the dp x cp group: a dense tensor is a replica only if whole over them all
        dense_dims = [d for d, n in (("dp", dims.dp), ("cp", dims.cp)) if n > 1]
        for p in self.parallel.placements:
            if p.is_expert and "edp" in p.replicated_over:
                expert.append((p.name, p.param))
            elif not p.is_expert and all(d in p.replicated_over for d in dense_dims):
                dense.append((p.name, p.param))
        dense += [(name, buf) for name, buf in self.parallel.model.named_buffers()
                  if name.endswith("e_score_correction_bias")]
        # Dense replicas live over dp x cp (context parallelism keeps a whole copy on each cp rank).
        sets = [_ReplicaSet(self.groups.dp_cp_group, dense), _ReplicaSet(self.groups.edp_group, expert)]
        # The same groups on every rank, dp x cp first: collectives pair up in one global order.
        return [s for s in sets if _size(s.group) > 1]

    @property
    def num_mismatches(self) -> int:
        return len(self.mismatches)

    def metrics(self) -> dict[str, int]:
        """Counters since the start of this process: mismatching tensors, failed checks, checks run."""
        return {"sdc/mismatches": self.num_mismatches, "sdc/failed_checks": self.num_failed_checks,
                **{f"sdc/{kind}_checks": n for kind, n in self.num_checks.items()}}

    # ------------------------------------------------------------------------- replay
    def replay_due(self, step: int) -> bool:
        return self.cfg.replay_interval > 0 and step % self.cfg.replay_interval == 0

    def forward_backward_replayed(self, micro_batches: Sequence[dict], *, step: int,
                                  run: Callable[[dict, Any], Any], parts: Any) -> list:
        """Every micro-batch forward + backward (``run(mb, parts) -> moe stats``, adding its loss parts
        to ``parts``), the chosen one captured in isolation, then its replay compared.

        The loss side of the capture is every float in ``parts`` (a dataclass, nested ones included)
        after the chosen micro-batch; the replay starts from a copy of ``parts`` as it was before it
        and must end on the same bits (exact: float64 sums of a few fp32 values).

        Returns:
            Per micro-batch the stats, as without replay (``parts`` filled in place).

        Raises:
            SDCHaltError / SDCRollback: a mismatch under ``halt`` / ``rollback`` (on every rank).
        """
        chosen = self.cfg.replay_microbatch % len(micro_batches)
        stats, before = [], None
        for i, mb in enumerate(micro_batches):
            if i == chosen:
                before = copy.deepcopy(parts)
                stats.append(self._first_pass(functools.partial(run, mb, parts), parts, step=step))
            else:
                stats.append(run(mb, parts))
        stash = self._stash_grads()
        run(micro_batches[chosen], before)
        second = self._capture(before)
        self._put_back(stash)
        found = compare_checksums(self._first, second, step=step, rank=self.rank, check="replay")
        self._resolve(found, step=step, check="replay")
        return stats

    def _grad_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(p.name, p.param) for p in self.parallel.placements]

    def _stash_grads(self) -> list[Optional[torch.Tensor]]:
        stash = []
        for _, p in self._grad_params():
            stash.append(p.grad)
            p.grad = None
        return stash

    def _put_back(self, stash: list[Optional[torch.Tensor]]) -> None:
        for (_, p), old in zip(self._grad_params(), stash):
            p.grad = old

    @torch.no_grad()
    def _add_back(self, stash: list[Optional[torch.Tensor]]) -> None:
        """grad = stashed + isolated: what autograd's ``grad += new`` would have given (IEEE addition
        commutes)."""
        for (_, p), old in zip(self._grad_params(), stash):
            if old is None:
                continue
            if p.grad is not None:
                old.add_(p.grad)
            p.grad = old

    def _capture(self, parts: Any) -> dict[str, int]:
        loss = torch.tensor(_floats(dataclasses.asdict(parts)), dtype=torch.float64)
        return checksums([("loss", loss)] + [(name, p.grad) for name, p in self._grad_params()])

    def _first_pass(self, run: Callable[[], Any], parts: Any, *, step: int) -> Any:
        stash = self._stash_grads()
        hook = self.injector.activation_hook(self.parallel.model, step=step) if self.injector else None
        try:
            stats = run()
        finally:
            if hook is not None:
                hook.remove()
        if self.injector is not None:
            self.injector.check_activation_injected(step=step)
            self.injector.after_backward(self.parallel.model, step=step)
        self._first = self._capture(parts)
        self._add_back(stash)
        return stats

    # ------------------------------------------------------------------------- replay under DeepSpeed
    def forward_backward_replayed_functional(self, micro_batches: Sequence[dict], *, step: int,
                                             forward: Callable[[dict, Any], tuple[torch.Tensor, Any]],
                                             backward: Callable[[torch.Tensor], None], parts: Any) -> list:
        """``forward_backward_replayed`` where the backward's gradients are not ours to move:
        DeepSpeed's ZeRO engine takes each micro-batch's gradient into its own buffers. The chosen
        micro-batch's training forward (``forward(mb, parts) -> (objective [], stats)``) is the first
        computation; its gradient is taken once with ``torch.autograd.grad`` (which runs no
        accumulate-grad hook, so the engine sees nothing) before ``backward(objective)`` trains on it;
        the replay (forward + ``torch.autograd.grad``) must give the same loss and gradient bits.
        Fault injection: ``activation`` in the first forward, ``gradient`` in the first gradient.

        Returns / raises: as ``forward_backward_replayed``.
        """
        chosen = self.cfg.replay_microbatch % len(micro_batches)
        stats, before = [], None
        for i, mb in enumerate(micro_batches):
            if i != chosen:
                objective, mb_stats = forward(mb, parts)
                backward(objective)
                stats.append(mb_stats)
                continue
            before = copy.deepcopy(parts)
            hook = self.injector.activation_hook(self.parallel.model, step=step) if self.injector else None
            try:
                objective, mb_stats = forward(mb, parts)
            finally:
                if hook is not None:
                    hook.remove()
            grads = self._functional_grads(objective, retain_graph=True)
            if self.injector is not None:
                self.injector.check_activation_injected(step=step)
                self.injector.after_backward_grads(grads, step=step)
            self._first = self._capture_named(parts, grads)
            backward(objective)
            stats.append(mb_stats)
        objective, _ = forward(micro_batches[chosen], before)
        second = self._capture_named(before, self._functional_grads(objective, retain_graph=False))
        found = compare_checksums(self._first, second, step=step, rank=self.rank, check="replay")
        self._resolve(found, step=step, check="replay")
        return stats

    def _functional_grads(self, objective: torch.Tensor, *, retain_graph: bool) -> dict[str, Optional[torch.Tensor]]:
        named = [(name, p) for name, p in self._grad_params() if p.requires_grad]
        grads = torch.autograd.grad(objective, [p for _, p in named], retain_graph=retain_graph, allow_unused=True)
        return {name: g for (name, _), g in zip(named, grads)}

    def _capture_named(self, parts: Any, grads: dict[str, Optional[torch.Tensor]]) -> dict[str, int]:
        loss = torch.tensor(_floats(dataclasses.asdict(parts)), dtype=torch.float64)
        return checksums([("loss", loss)] + list(grads.items()))

    # ------------------------------------------------------------------------- replay under PP
    def replay_pipeline(self, pipeline: PipelineRunner, micro_batches: list[dict], step_input: Any, *,
                        step: int) -> PipelineStepOutput:
        """The pipeline's step (``pipeline.step``, unchanged) plus the replay of one micro-batch, per stage.

        The schedule interleaves micro-batches and accumulates their gradients, so the chosen
        micro-batch is recomputed on its own through the stages (``PipelineRunner.run_isolated``:
        forward in stage order, backward in reverse, the training forward of every stage, load-balance
        loss attached as in the schedule) twice, the trainer's gradients stashed meanwhile: the first
        run takes the fault injection, the second is the replay. Per stage the checksums of its
        output, its loss terms, its input-activation gradient and its parameters' gradients must
        agree bit for bit (names ``stage{s}/output``, ``stage{s}/loss``, ``stage{s}/input_grad`` and
        the parameter names); the first run's stage outputs must also equal those the schedule
        computed for that micro-batch (``stage{s}/output@schedule``), which ties the check to the
        training forward. Cost: two micro-batches' forward and backward run stage after stage.
        Collective over the pipeline group (and the world group when reporting).

        Raises:
            SDCHaltError / SDCRollback: a mismatch under ``halt`` / ``rollback`` (on every rank).
        """
        chosen = self.cfg.replay_microbatch % len(micro_batches)
        out = pipeline.step(micro_batches, step_input, keep_output_of=chosen)
        stash = self._stash_grads()
        first, first_outputs = self._pipeline_pass(pipeline, micro_batches[chosen], step_input, step=step, inject=True)
        self._stash_grads()  # drop the first run's gradients
        second, _ = self._pipeline_pass(pipeline, micro_batches[chosen], step_input, step=step, inject=False)
        self._put_back(stash)
        scheduled = checksums((f"stage{s}/output@schedule", t) for s, t in sorted(out.kept_outputs.items()))
        found = compare_checksums(first, second, step=step, rank=self.rank, check="replay")
        found += compare_checksums(scheduled, {k: first_outputs[k] for k in scheduled if k in first_outputs},
                                   step=step, rank=self.rank, check="replay")
        self._resolve(found, step=step, check="replay")
        return out

    def _pipeline_pass(self, pipeline: PipelineRunner, mb: dict, step_input: Any, *, step: int,
                       inject: bool) -> tuple[dict[str, int], dict[str, int]]:
        """One isolated run of ``mb`` through the stages: (checksums of every stage's output, loss terms,
        input gradient and the parameter gradients; those of the outputs under ``@schedule`` names)."""
        injector = self.injector if inject else None
        hook = injector.activation_hook(self.parallel.model, step=step) if injector else None
        try:
            results = pipeline.run_isolated(mb, step_input, stage_fn=_training_forward, param_grads=True)
        finally:
            if hook is not None:
                hook.remove()
        if injector is not None:
            injector.check_activation_injected(step=step)
            injector.after_backward(self.parallel.model, step=step)
        named: list[tuple[str, Optional[torch.Tensor]]] = []
        for r in results:
            named += [(f"stage{r.stage_index}/output", r.output), (f"stage{r.stage_index}/loss", r.record.loss_sums),
                      (f"stage{r.stage_index}/input_grad", r.input_grad)]
        outputs = checksums((f"stage{r.stage_index}/output@schedule", r.output) for r in results)
        return checksums(named + [(name, p.grad) for name, p in self._grad_params()]), outputs

    # ------------------------------------------------------------------------- replicas
    def after_optimizer(self, *, step: int) -> None:
        """Parameter fault injection, then the cross-replica check when due (every ``sdc.replica_interval``
        steps, and at the first step after a resume; collective)."""
        if self.injector is not None:
            self.injector.after_optimizer(self.parallel.model, step=step)
        due = bool(self.cfg.replica_interval and step % self.cfg.replica_interval == 0)
        if due or step == self._replica_check_forced_at:
            self._check_replicas(step=step)

    def after_resume(self, *, step: int) -> None:
        """The run resumed from the checkpoint of ``step``: its replicas loaded one stored copy, so they
        agree there (a rollback target); compare them again after the first step of this process."""
        if self.enabled:
            self.last_replica_clean_step = step
            self._replica_check_forced_at = step + 1

    def before_checkpoint(self, *, step: int) -> bool:
        """Compare the replicas right before the checkpoint of ``step`` is written (with any SDC check on;
        skipped when this step's parameters were just compared). Collective: every rank calls it.

        Returns:
            True when the checkpoint may be written (replicas agree, or nothing to compare); False under
            ``sdc.policy=warn`` after a mismatch (the checkpoint is then not written).

        Raises:
            SDCHaltError / SDCRollback: a mismatch under ``halt`` / ``rollback`` (on every rank).
        """
        if not self._replica_sets:
            return True
        if self._replicas_checked_at != step:
            self._check_replicas(step=step)
        return self.last_replica_clean_step == step

    def _check_replicas(self, *, step: int) -> None:
        found: list[Mismatch] = []
        for replica_set in self._replica_sets:
            found += cross_replica_mismatches(replica_set.named, group=replica_set.group, step=step)
        self._replicas_checked_at = step
        self._resolve(found, step=step, check="replica")

    # ------------------------------------------------------------------------- policy
    def _agree(self, local: list[Mismatch]) -> list[Mismatch]:
        """Every rank's mismatches, on every rank (duplicates from replica groups removed)."""
        if _size(self.world_group) == 1:
            return local
        count = torch.tensor([len(local)], dtype=torch.int64)
        # [1] per rank -> all_reduce(sum, world) -> [1]
        dist.all_reduce(count, group=self.world_group)
        if count.item() == 0:
            return []
        per_rank: list[Any] = [None] * self.world_group.size()
        dist.all_gather_object(per_rank, local, group=self.world_group)
        return list(dict.fromkeys(m for found in per_rank for m in found))

    def _resolve(self, local: list[Mismatch], *, step: int, check: str) -> None:
        self.num_checks[check] += 1
        found = self._agree(local)
        if not found:
            if check == "replica":
                self.last_replica_clean_step = step
            return
        self.mismatches += found
        self.num_failed_checks += 1
        ranks = sorted({m.rank for m in found})
        for m in found[:_MAX_LOGGED]:
            logger.error("%s", m)
        if len(found) > _MAX_LOGGED:
            logger.error("... and %d more mismatching tensors", len(found) - _MAX_LOGGED)
        summary = (f"silent data corruption suspected: {check} check at step {step} found {len(found)} "
                   f"mismatching tensor(s) on rank(s) {ranks} (first: {found[0].tensor!r})")
        if self.policy is SDCPolicy.warn:
            logger.error("%s; sdc.policy=warn: continuing", summary)
            return
        # Replay: the parameters at the start of this step are clean. Replica: only those of the
        # last step whose replica check passed are known to be.
        max_step = step - 1 if check == "replay" else self.last_replica_clean_step
        if self.policy is SDCPolicy.halt:
            set_aside = self._set_aside_newer_than(max_step)
            raise SDCHaltError(f"{summary}; sdc.policy=halt: stopping every rank, no checkpoint written from "
                               f"this state{'; set aside as suspect: ' + ', '.join(set_aside) if set_aside else ''}",
                               found)
        if self._rolled_back_from is not None and step <= self._rolled_back_from:
            raise SDCHaltError(f"{summary} again after rolling back from step {self._rolled_back_from}: a "
                               "persistent fault (check this rank's hardware); halting", found)
        raise SDCRollback(step=step, max_step=max_step, mismatches=found)

    def _set_aside_newer_than(self, max_step: int) -> list[str]:
        """Rename complete checkpoints of step > ``max_step`` to ``step_N.suspect`` (rank 0; collective),
        so that no resume picks them. Returns their names."""
        if self.checkpoint_root is None:
            return []
        newer = [path for step, path in list_checkpoints(self.checkpoint_root) if step > max_step]
        if _size(self.world_group) > 1:
            dist.barrier(group=self.world_group)  # every rank has listed before rank 0 renames
        if self.rank == 0:
            for path in newer:
                path.rename(path.with_name(path.name + ".suspect"))
        if _size(self.world_group) > 1:
            dist.barrier(group=self.world_group)
        return [path.name for path in newer]


class RollbackTarget(Protocol):
    """What ``rollback_to_good_checkpoint`` uses of the trainer (``longcat.train.trainer.Trainer``,
    which imports this module)."""

    checkpoints: CheckpointManager
    sdc: SDCMonitor

    def load_checkpoint(self, path: Path) -> None: ...


def rollback_to_good_checkpoint(trainer: RollbackTarget, request: SDCRollback) -> Path:
    """Answer ``request`` on every rank: load the newest complete checkpoint of step <=
    ``request.max_step`` into ``trainer`` (``Trainer.load_checkpoint``) and set newer ones aside as
    ``step_N.suspect`` so that no later resume picks them. Returns the checkpoint loaded.

    Raises:
        SDCHaltError: no such checkpoint (retention deleted it, or none was written yet).
    """
    root = trainer.checkpoints.root
    good = [(step, path) for step, path in list_checkpoints(root) if step <= request.max_step]
    if not good:
        raise SDCHaltError(f"{request}, but there is no complete checkpoint of step <= {request.max_step} under "
                           f"{root} (train.checkpoint_interval / keep_last); halting", request.mismatches)
    step, path = good[-1]
    monitor = trainer.sdc
    monitor.checkpoint_root = root
    monitor._set_aside_newer_than(step)
    trainer.load_checkpoint(path)
    monitor._rolled_back_from = request.step
    monitor.last_replica_clean_step = step
    monitor._replicas_checked_at = None  # the steps after `step` are trained (and checked) again
    logger.warning("SDC rollback: reloaded %s (step %d) after the mismatch at step %d", path, step, request.step)
    return path
