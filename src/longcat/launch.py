"""Process setup for one training run: distributed init, process groups, trainer, summary."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from longcat.config.schema import RunConfig

logger = logging.getLogger(__name__)


def _init_distributed(run_cfg: RunConfig):
    """Init the default process group when launched by torchrun; build ProcessGroups."""
    from longcat.distributed import ParallelDims, ProcessGroups

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p = run_cfg.parallel
    dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep)
    dims.check_model(num_attention_heads=run_cfg.model.num_attention_heads,
                     n_routed_experts=run_cfg.model.n_routed_experts,
                     num_layers=run_cfg.model.num_layers, num_stages=p.pp)
    if world_size == 1:
        return dims, ProcessGroups.single()
    if not dist.is_initialized():
        backend = "nccl" if run_cfg.train.device == "cuda" else "gloo"
        if run_cfg.train.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return dims, ProcessGroups.build(dims, device_type=run_cfg.train.device)


def run_training(run_cfg: RunConfig, cfg_dict: dict) -> int:
    from longcat.train.trainer import Trainer

    dims, groups = _init_distributed(run_cfg)
    run_cfg.validate(dp=dims.dp)
    try:
        trainer = Trainer(run_cfg, groups=groups, config_dict=cfg_dict)
        summary = trainer.fit()
        if trainer.is_rank0:
            out = Path(run_cfg.train.out_dir).resolve()
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
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0
