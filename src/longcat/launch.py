"""Process setup for one training run: distributed init, process groups, trainer, summary.

Under ``torchrun`` every process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, validates
the configuration for that world size (``longcat.config.validate``, the same checks as
``longcat-train --validate``), joins the default process group (NCCL on ``train.device=cuda``, else gloo)
and builds its ``ProcessGroups`` from ``parallel.*``; nothing is built before the checks pass::

    torchrun --nproc-per-node 2 -m longcat.train parallel=ep2
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m longcat.train parallel.tp=2 parallel.ep=8 train.device=cuda
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from longcat.config.schema import Device, RunConfig
from longcat.config.validate import validate, world_size_from_env
from longcat.distributed import ParallelDims, ProcessGroups
from longcat.distributed.elastic import restart_safe_store
from longcat.distributed.node_watch import start_node_watch
from longcat.model.compile import cpp_compiler_problem
from longcat.train.callbacks import Callback
from longcat.train.determinism import enable_determinism
from longcat.train.nonfinite import NonFiniteCheckpointError, NonFiniteError
from longcat.train.sdc_check import SDCHaltError
from longcat.train.shared_dir import check_shared_out_dir
from longcat.train.trainer import Trainer

logger = logging.getLogger(__name__)


def _init_distributed(run_cfg: RunConfig, *, world_size: int):
    """Init the default process group when launched by torchrun; build ProcessGroups (``run_cfg`` validated
    for ``world_size``)."""
    dims = ParallelDims.from_config(run_cfg.parallel, world_size=world_size)
    if world_size == 1:
        return dims, ProcessGroups.single()
    if not dist.is_initialized():
        # On GPU: NCCL for CUDA tensors, gloo for the small CPU reductions (token counts, router counts).
        cuda = run_cfg.train.device == Device.cuda
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(minutes=10)
        store = restart_safe_store(timeout=timeout)  # a fresh key space per torchrun restart
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=int(os.environ["RANK"]),
                                    world_size=world_size)
    return dims, ProcessGroups.build(dims, device_type=str(run_cfg.train.device))


def run_training(run_cfg: RunConfig, cfg_dict: dict, *, callbacks: Sequence[Callback] = ()) -> int:
    """Train ``run_cfg``; returns the exit code: 0, or ``SDC_EXIT_CODE`` (3) when silent data corruption
    halted the run, ``NONFINITE_EXIT_CODE`` (4) when a NaN/Inf stopped it (every rank returns it).
    ``callbacks``: extra callbacks for the trainer (tests' fault injection).

    Raises:
        ConfigError: ``run_cfg`` is not valid for this world size (``longcat.config.validate``), before any work.
        ValueError: bad data, tokenizer or checkpoint files (each naming the file and the fix).
    """
    start_node_watch()  # under torchrun: stop when this node's agent or another node is lost, instead of hanging
    world_size = world_size_from_env()
    validate(run_cfg, world_size=world_size)  # every check the configuration allows, before any work
    preflight(run_cfg)
    if run_cfg.determinism.enabled:
        enable_determinism()  # before CUDA and NCCL start: their environment variables are read once
    dims, groups = _init_distributed(run_cfg, world_size=world_size)
    try:
        check_shared_out_dir(run_cfg.train.out_dir, group=groups.world_group, rank=groups.rank)
        trainer = Trainer(run_cfg, groups=groups, config_dict=cfg_dict, callbacks=callbacks)
        summary = trainer.fit()
        if trainer.is_rank0:
            _print_summary(run_cfg, summary)
    except (SDCHaltError, NonFiniteError, NonFiniteCheckpointError) as exc:  # raised on every rank alike
        logger.error("stopping: %s", exc)
        _close_process_groups()
        return exc.exit_code
    # Any other exception propagates without a barrier or any collective: a peer may be dead or stuck in
    # one, and waiting for it would hang this rank too. Exiting lets torchrun stop the job.
    _close_process_groups()
    return 0


def preflight(run_cfg: RunConfig) -> None:
    """The run's environment, checked on every rank before anything is built: the output folder can be
    written, wandb online has credentials, the device exists. Each failure is one clear ``ValueError``.

    Raises:
        ValueError: naming the setting and the fix.
    """
    out = Path(run_cfg.train.out_dir)
    existing = out
    while not existing.exists() and existing != existing.parent:  # created later: test where it will be
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        probe = existing / f".longcat-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"train.out_dir={str(out)!r} cannot be written ({exc}); choose a writable "
                         "folder (every rank writes checkpoints there)") from None
    if str(run_cfg.logging.wandb.mode) == "online" and not _wandb_has_credentials():
        raise ValueError("logging.wandb.mode=online but wandb has no API key (no WANDB_API_KEY and no `wandb login` "
                         "in ~/.netrc); run `wandb login`, or use logging.wandb.mode=offline (sync later) or disabled")
    if run_cfg.train.device == Device.cuda and not torch.cuda.is_available():
        raise ValueError(f"train.device=cuda but this torch ({torch.__version__}) sees no CUDA device; use "
                         "train.device=cpu, or install a CUDA build of torch on a machine with a GPU")
    if run_cfg.train.compile and run_cfg.train.device == Device.cpu:
        problem = cpp_compiler_problem()
        if problem is not None:
            raise ValueError(problem)


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _close_process_groups() -> None:
    """After a run every rank finished alike: wait for the others, then release the groups."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _print_summary(run_cfg: RunConfig, summary: dict) -> None:
    out = Path(run_cfg.train.out_dir).resolve()
    if "preempted_at_step" in summary:  # SIGTERM: checkpointed and stopping cleanly (exit 0)
        print(f"\n== longcat run preempted at step {summary['preempted_at_step']} of {run_cfg.train.steps}; "
              f"checkpoint {summary.get('checkpoint')}; relaunch with train.resume=auto to continue ==")
        return
    print("\n== longcat run finished ==")
    for key in ("initial_val_loss", "final_val_loss"):
        if key in summary:
            print(f"{key}: {summary[key]:.4f}")
    print(f"steps: {summary.get('final_step')}")
    print(f"checkpoints: {out / 'checkpoints'}")
    print(f"metrics: {summary.get('metrics_file')}")
    print(f"plots: python tools/plot_metrics.py --metrics {summary.get('metrics_file')} --output {out / 'plots'}")
    if summary.get("wandb_dir"):
        print(f"wandb run ({run_cfg.logging.wandb.mode}): {summary['wandb_dir']}"
              + ("  (upload: wandb sync <dir>)" if run_cfg.logging.wandb.mode == "offline" else ""))
