"""Process setup for one training run: distributed init, process groups, trainer, summary.

Under ``torchrun`` every process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, joins the
default process group (NCCL on ``train.device=cuda``, else gloo) and builds its ``ProcessGroups`` from
``parallel.*``; invalid layouts fail here, before any model is built::

    torchrun --nproc-per-node 2 -m longcat.train parallel=ep2
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m longcat.train parallel.tp=2 parallel.ep=8 train.device=cuda
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from longcat.config.schema import RunConfig
from longcat.train.shared_dir import check_shared_out_dir

logger = logging.getLogger(__name__)


def _init_distributed(run_cfg: RunConfig):
    """Init the default process group when launched by torchrun; build ProcessGroups."""
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.distributed.parallelize import check_layout
    from longcat.distributed.pipeline_stage import PipelineSchedule
    from longcat.train.trainer import parallel_options

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p = run_cfg.parallel
    dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep)
    try:
        stages_per_rank = PipelineSchedule(p.pp_schedule).stages_per_rank if p.pp > 1 else 1
    except ValueError:
        raise ValueError(f"parallel.pp_schedule={p.pp_schedule!r}: use one of "
                         f"{[s.value for s in PipelineSchedule]}") from None
    dims.check_model(num_attention_heads=run_cfg.model.num_attention_heads,
                     n_routed_experts=run_cfg.model.n_routed_experts,
                     num_layers=run_cfg.model.num_layers, num_stages=p.pp * stages_per_rank)
    check_layout(dims, parallel_options(run_cfg))
    if world_size == 1:
        return dims, ProcessGroups.single()
    if not dist.is_initialized():
        # On GPU: NCCL for CUDA tensors, gloo for the small CPU reductions (token counts, router counts).
        backend = "cpu:gloo,cuda:nccl" if run_cfg.train.device == "cuda" else "gloo"
        if run_cfg.train.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        from longcat.distributed.elastic import restart_safe_store

        timeout = timedelta(minutes=10)
        store = restart_safe_store(timeout=timeout)  # a fresh key space per torchrun restart
        rendezvous = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]), "world_size": world_size}
        dist.init_process_group(backend=backend, timeout=timeout, **rendezvous)
    return dims, ProcessGroups.build(dims, device_type=run_cfg.train.device)


def run_training(run_cfg: RunConfig, cfg_dict: dict) -> int:
    """Train ``run_cfg``; returns the exit code: 0, or ``SDC_EXIT_CODE`` (3) when silent data corruption
    halted the run, ``NONFINITE_EXIT_CODE`` (4) when a NaN/Inf stopped it (every rank returns it)."""
    from longcat.train.determinism import enable_determinism
    from longcat.train.nonfinite import NonFiniteCheckpointError, NonFiniteError
    from longcat.train.sdc_check import SDCHaltError
    from longcat.train.trainer import Trainer

    if run_cfg.determinism.enabled:
        enable_determinism()  # before CUDA and NCCL start: their environment variables are read once
    dims, groups = _init_distributed(run_cfg)
    check_shared_out_dir(run_cfg.train.out_dir, group=groups.world_group, rank=groups.rank)
    run_cfg.validate(dp=dims.dp)
    try:
        trainer = Trainer(run_cfg, groups=groups, config_dict=cfg_dict)
        summary = trainer.fit()
        if trainer.is_rank0:
            out = Path(run_cfg.train.out_dir).resolve()
            if "preempted_at_step" in summary:  # SIGTERM: checkpointed and stopping cleanly (exit 0)
                print(f"\n== longcat run preempted at step {summary['preempted_at_step']} of {run_cfg.train.steps}; "
                      f"checkpoint {summary.get('checkpoint')}; relaunch with train.resume=auto to continue ==")
            print("\n== longcat run finished ==")
            for key in ("initial_val_loss", "final_val_loss"):
                if key in summary:
                    print(f"{key}: {summary[key]:.4f}")
            print(f"steps: {summary.get('final_step')}")
            print(f"checkpoints: {out / 'checkpoints'}")
            print(f"metrics: {summary.get('metrics_file')}")
            print(f"plots: python tools/plot_metrics.py --metrics {summary.get('metrics_file')} "
                  f"--output {out / 'plots'}")
            if summary.get("wandb_dir"):
                print(f"wandb run ({run_cfg.logging.wandb.mode}): {summary['wandb_dir']}"
                      + ("  (upload: wandb sync <dir>)" if run_cfg.logging.wandb.mode == "offline" else ""))
    except (SDCHaltError, NonFiniteError, NonFiniteCheckpointError) as exc:  # raised on every rank alike
        logger.error("stopping: %s", exc)
        return exc.exit_code
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0
