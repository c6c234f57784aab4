"""Data parallelism in three modes (``parallel.dp_mode``): replicate, fsdp, deepspeed.

The training objective is already normalised by *global* token counts (``train/losses.py``), so a
rank's gradient is its share of the global gradient and data-parallel replicas must **sum** their
gradients, never average them:

- ``replicate``: every rank holds whole (or TP/EP-sharded) parameters; after the last backward of a
  step, ``ReplicatedGradSync`` sums dense grads over ``dp`` and expert grads over ``edp`` with
  bucketed flat all-reduces (Megatron's DDP without the overlap).
- ``fsdp``: FSDP2 ``fully_shard`` over the ``dp`` mesh per decoder layer (and the root), the routed
  experts over the ``edp`` mesh when expert parallelism is on; gradients are reduce-scattered as
  sums (``set_gradient_divide_factor(1.0)``).
- ``deepspeed``: a DeepSpeed ZeRO stage 1/2 engine (optimizer CPU offload optional) with
  ``gradient_allreduce_op=sum``; dp only (no tp/ep/pp), see ``DeepSpeedDP``.

Shapes: P = flattened elements of one bucket.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from longcat.config.schema import DPMode  # the parallel.dp_mode enum, re-exported

logger = logging.getLogger(__name__)

__all__ = ["DPMode", "DeepSpeedDP", "ReplicatedGradSync", "apply_fsdp"]

DEFAULT_BUCKET_BYTES = 25 * 2**20


# ----------------------------------------------------------------------------------- replicate


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup


def _grad(param: nn.Parameter) -> torch.Tensor:
    """``param.grad`` of a bucketed parameter (buckets hold only parameters with a gradient)."""
    assert param.grad is not None
    return param.grad


class ReplicatedGradSync:
    """Sums gradients over each parameter's data-parallel group with bucketed flat all-reduces.

    Parameters whose group has size 1 are left alone. A parameter without a gradient on every rank
    of its group keeps ``grad=None`` (so AdamW skips it, as in one process); one that has a gradient
    on some rank only gets zeros on the others first (agreed by a small all-reduce per group).

    Args:
        params_and_groups: ``(param, group)`` pairs, in a fixed order (the same on every rank of
            each group): dense params with ``dp_group``, expert params with ``edp_group``.
        bucket_bytes: target size of one flat all-reduce.
    """

    def __init__(self, params_and_groups: Sequence[tuple[nn.Parameter, dist.ProcessGroup]], *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self._by_group: dict[int, tuple[dist.ProcessGroup, list[nn.Parameter]]] = {}
        for param, group in params_and_groups:
            if group.size() > 1:
                self._by_group.setdefault(id(group), (group, []))[1].append(param)
        self.bucket_bytes = bucket_bytes

    def _buckets(self, group: dist.ProcessGroup, params: list[nn.Parameter]) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        size = 0
        for p in params:
            g = p.grad
            if g is None:
                continue
            last = _grad(buckets[-1].params[0]) if buckets else None
            if (last is None or size + g.numel() * g.element_size() > self.bucket_bytes
                    or last.dtype != g.dtype or last.device != g.device):
                buckets.append(_Bucket([], group))
                size = 0
            buckets[-1].params.append(p)
            size += g.numel() * g.element_size()
        return buckets

    @staticmethod
    def _agree_on_grads(group: dist.ProcessGroup, params: list[nn.Parameter]) -> None:
        has_P = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        # [num params] int32 0/1 -> all_reduce(max, group) -> [num params]
        dist.all_reduce(has_P, op=dist.ReduceOp.MAX, group=group)
        for p, has in zip(params, has_P.tolist()):
            if has and p.grad is None:
                p.grad = torch.zeros_like(p)

    @torch.no_grad()
    def sync(self) -> None:
        """Sum every gradient over its group, in place. Collective over every group it holds."""
        for group, params in self._by_group.values():
            self._agree_on_grads(group, params)
            in_flight = []
            for bucket in self._buckets(group, params):
                flat_P = torch.cat([_grad(p).reshape(-1) for p in bucket.params])
                # [P] local grads -> all_reduce(sum, dp or edp) -> [P] summed grads
                in_flight.append((bucket, flat_P, dist.all_reduce(flat_P, group=group, async_op=True)))
            for bucket, flat_P, work in in_flight:
                work.wait()
                offset = 0
                for p in bucket.params:
                    grad = _grad(p)
                    n = grad.numel()
                    grad.copy_(flat_P[offset: offset + n].view_as(grad))
                    offset += n


# ----------------------------------------------------------------------------------- fsdp


def apply_fsdp(model: nn.Module, *, blocks: Sequence[nn.Module], dp_mesh, expert_modules: Sequence[nn.Module] = (),
               expert_mesh=None, reshard_after_forward: bool = True,
               keep_whole: Sequence[nn.Parameter] = ()) -> list[nn.Parameter]:
    """FSDP2 ``fully_shard`` of ``blocks`` (decoder layers, MTP) and then ``model`` over ``dp_mesh``.

    Expert modules are sharded first over ``expert_mesh`` (the 1-D ``edp`` mesh) when it has size
    > 1; else they stay whole (``ignored_params``: nothing to reduce).
    Every FSDP unit sums its gradients (divide factor 1): the loss is already globally normalised.
    Under pipeline parallelism call it once per pipeline stage (each stage module its own root).

    Args:
        model: the module (or pipeline stage) whose remaining params go into the root unit.
        blocks: sub-modules of ``model`` that each become one FSDP unit, in forward order.
        dp_mesh: 1-D ``DeviceMesh`` over the data-parallel ranks (``dense_mesh["dp"]``).
        expert_modules: the routed-expert modules (their grads sum over edp, not dp).
        expert_mesh: 1-D ``DeviceMesh`` over ``edp`` for ``expert_modules``.
        reshard_after_forward: free each unit's gathered parameters after its forward (gather
            again for the backward); False keeps them until the backward is over.
        keep_whole: further parameters of ``model`` to leave unsharded (e.g. one that two pipeline
            stages on this rank share: two FSDP roots cannot manage one parameter); the caller sums
            their gradients over dp.

    Returns:
        The parameters left unsharded (expert params with ``edp == 1``, and ``keep_whole``), in
        ``model.parameters()`` order.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    ignored: set[nn.Parameter] = set(keep_whole)
    for experts in expert_modules:
        if expert_mesh is not None and expert_mesh.size() > 1:
            fully_shard(experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward)
        else:
            ignored.update(experts.parameters())
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored or None)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives (no PREMUL_SUM: gloo lacks it, and factor 1 needs no scaling).
            module.set_force_sum_reduction_for_comms(True)
    return [p for p in model.parameters() if p in ignored]


# ----------------------------------------------------------------------------------- deepspeed


@dataclass(frozen=True)
class DeepSpeedOptions:
    """``zero_stage`` 1 or 2; ``offload_optimizer``: keep optimizer states on the CPU (ZeRO-Offload)."""

    zero_stage: int = 2
    offload_optimizer: bool = False


class DeepSpeedDP:
    """A DeepSpeed ZeRO-1/2 engine around the model and a torch optimizer, driven step by step.

    The trainer keeps its own micro-batch loop: ``backward`` accumulates each micro-batch's
    gradient locally (unmanaged gradient accumulation, no 1/accum scaling), ``step`` sums the
    gradients over dp (``gradient_allreduce_op=sum``), clips at DeepSpeed's global norm (the same
    formula as ``clip_grads_``) and applies the optimizer. The LR stays under the control of the
    torch scheduler on the wrapped optimizer's param groups.

    Only dp is supported (tp = ep = pp = 1): DeepSpeed's grad norm and partitioning know nothing of
    this package's TP/EP layouts.

    Args:
        model: the whole model (fp32).
        optimizer: a torch optimizer over ``model``'s params (its param groups are kept).
        dp_group: the data-parallel group (= world here).
        clip_grad: max global norm (0 = off).
        options: ZeRO stage and offload.

    Raises:
        ValueError: zero_stage not in (1, 2).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, dp_group: dist.ProcessGroup,
                 clip_grad: float, options: DeepSpeedOptions):
        import deepspeed

        if options.zero_stage not in (1, 2):
            raise ValueError(f"DeepSpeed zero_stage={options.zero_stage}: use 1 or 2 (stage 3 shards "
                             "parameters; use parallel.dp_mode=fsdp for that)")
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the trainer feeds the batches
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_allreduce_op": "sum",
            "gradient_clipping": float(clip_grad),
            "zero_optimization": {
                "stage": options.zero_stage,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_scatter": True,
                "round_robin_gradients": False,
            },
            "communication_data_type": "fp32",
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if options.offload_optimizer:
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
            # Keep the trainer's torch AdamW (its param groups carry the per-kind LRs and decays)
            # instead of DeepSpeed's JIT-compiled CPUAdam.
            config["zero_force_ds_cpu_optimizer"] = False
        _skip_cpu_inference_comm_op(deepspeed)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False,
            mpu=None, model_parameters=None)
        self.base_optimizer = optimizer
        self.options = options

    def backward(self, objective: torch.Tensor) -> None:
        self.engine.backward(objective, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip and update; returns the global grad norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    # Layout-independent optimizer state (collective: every rank of dp calls these).
    def full_optimizer_state(self, named_params: Sequence[tuple[str, nn.Parameter]]) -> dict[str, dict]:
        """``{fqn: {exp_avg, exp_avg_sq, step}}`` assembled from the ZeRO partitions (AdamW)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._relink_optimizer_states()
        step = self._step_count()
        out = {}
        for name, p in named_params:
            exp_avg = safe_get_full_optimizer_state(p, "exp_avg")
            if exp_avg is None:
                continue
            out[name] = {"exp_avg": exp_avg, "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"),
                         "step": torch.tensor(float(step))}
        return out

    def load_full_state(self, named_params: Sequence[tuple[str, nn.Parameter]], optim_state: dict[str, dict]) -> None:
        """Set the fp32 master weights from the (already loaded) module params and the optimizer state."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        self._init_optimizer_state()
        steps = set()
        for name, p in named_params:
            safe_set_full_fp32_param(p, p.detach().float())
            if name in optim_state:
                safe_set_full_optimizer_state(p, optim_state[name]["exp_avg"], "exp_avg")
                safe_set_full_optimizer_state(p, optim_state[name]["exp_avg_sq"], "exp_avg_sq")
                steps.add(float(optim_state[name]["step"]))
        if steps:
            for state in self.base_optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.full_like(torch.as_tensor(state["step"]), max(steps)) \
                        if torch.is_tensor(state["step"]) else max(steps)

    def _step_count(self) -> float:
        for state in self.base_optimizer.state.values():
            if "step" in state:
                return float(state["step"])
        return 0.0

    def _init_optimizer_state(self) -> None:
        """Create AdamW's state (zeros) on the flat fp32 partitions, as a first step would."""
        opt = self.base_optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in opt.state or not opt.state[p]:
                    opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}
        self._relink_optimizer_states()

    def _relink_optimizer_states(self) -> None:
        """Point every parameter's ZeRO fragment at its optimizer state. DeepSpeed links them lazily
        after the first step, but only for the first param group that steps (it steps one group at a
        time and sets its "linked" flag after the first): redo it for all groups."""
        zero = self.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()


def _skip_cpu_inference_comm_op(deepspeed) -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce (about a minute) that
    only its ``inference_all_reduce`` uses; training collectives go through torch.distributed."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
