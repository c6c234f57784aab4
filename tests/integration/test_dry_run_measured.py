"""The dry run against real training steps of the same configuration (1 and 2 gloo processes).

Per layout, each rank of the real run (``longcat.train.Trainer``, two optimizer steps) reports the
bytes of its local parameters, gradients and AdamW state and its peak RSS growth over the setup and
the steps (``VmHWM`` after resetting it, minus ``VmRSS`` before the trainer is built), with glibc's
mmap threshold fixed so that freed tensors leave RSS (without it the measured growth differed by 12%
between machines, and failed CI once). Two steps, because the dry run estimates the steady state:
from the second step on AdamW's moments exist while the activations are held (in the first step they
are allocated after the backward, so its peak is lower by the optimizer bytes).
The dry run of the same overrides for that rank must give exactly the same parameter, gradient and
optimizer bytes, and a peak-memory estimate within 25% of the measured growth (where the model's
state and activations dominate the process's growth: the small preset).

The presets run with the test corpus's 512-id vocabulary (tests/conftest.py), so no tokenizer is
trained here; everything else is the preset's.
"""

from __future__ import annotations

import gc

import torch
from conftest import tiny_overrides
from torch.distributed.tensor import DTensor

from longcat.bench.common import reset_peak_rss, return_freed_memory_to_os
from longcat.config.compose import compose_run_config
from longcat.planning import dry_run
from longcat.testing.distributed import run_distributed

PEAK_RTOL = 0.25


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def measure_real_step(overrides: list[str]) -> dict:
    """One rank of a real run: exact state bytes and peak RSS growth (bytes) of build + two steps."""
    import torch.distributed as dist

    from longcat.config.validate import validate
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.train.trainer import Trainer

    cfg, _ = compose_run_config("pretrain", overrides)
    world = dist.get_world_size() if dist.is_initialized() else 1
    validate(cfg, world_size=world)
    groups = (ProcessGroups.build(ParallelDims.from_config(cfg.parallel, world_size=world)) if world > 1
              else ProcessGroups.single())
    return_freed_memory_to_os()  # RSS = live tensors, whatever the machine's allocator history
    gc.collect()
    reset_peak_rss()
    base_kib = _status_kib("VmRSS")
    trainer = Trainer(cfg, groups=groups)
    for _ in range(2):
        trainer.train_step()
    peak_kib = _status_kib("VmHWM")
    params = [p.param for p in trainer.parallel.placements]
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "rank": groups.rank,
        "weights": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(t) for t in state),
        "peak_growth": (peak_kib - base_kib) * 1024,
    }


def _check(overrides: list[str], measured: list[dict], *, check_peak: bool) -> None:
    cfg, _ = compose_run_config("pretrain", overrides)
    for real in measured:
        report = dry_run(cfg, world_size=len(measured), rank=real["rank"])
        assert report.state.weights == real["weights"], (real["rank"], report.state, real)
        assert report.state.grads == real["grads"], (real["rank"], report.state, real)
        assert report.state.optimizer == real["optimizer"], (real["rank"], report.state, real)
        if check_peak:
            ratio = report.peak_bytes / real["peak_growth"]
            print(f"rank {real['rank']}: dry-run peak {report.peak_bytes / 2**20:.1f} MiB, measured growth "
                  f"{real['peak_growth'] / 2**20:.1f} MiB, ratio {ratio:.2f}")
            assert abs(ratio - 1) <= PEAK_RTOL, (
                f"rank {real['rank']}: dry-run peak {report.peak_bytes / 2**20:.1f} MiB vs measured growth "
                f"{real['peak_growth'] / 2**20:.1f} MiB (ratio {ratio:.2f})")


def _small(corpus_cache: str, out_dir: str, **extra) -> list[str]:
    base = [o for o in tiny_overrides(corpus_cache, out_dir) if not o.startswith(("model.", "moe."))]
    overrides = {"data.seq_length": 256, "data.micro_batch_size": 8, "data.global_batch_size": 8,
                 "train.eval_interval": 0, "train.checkpoint_interval": 0, **extra}
    return ["model=small", "model.vocab_size=512", "moe.expected_ffn_experts=2.67", *base,
            *[f"{k}={v}" for k, v in overrides.items()]]


def test_small_preset_one_process(corpus_cache, tmp_path):
    overrides = _small(corpus_cache, str(tmp_path))
    measured = run_distributed(measure_real_step, world_size=1, args=(overrides,), timeout_s=300)
    _check(overrides, measured, check_peak=True)


def measure_real_steps(runs: list[list[str]]) -> list[dict]:
    """``measure_real_step`` for several runs one after the other in the same processes (one start-up).
    Only the first run's peak is a clean measurement (later ones reuse freed heap)."""
    return [measure_real_step(overrides) for overrides in runs]


TINY_LAYOUTS = {"ep2": ["parallel.ep=2"], "pp2": ["parallel.pp=2"], "tp2": ["parallel.tp=2"],
                "fsdp2": ["parallel.dp_mode=fsdp"]}


def test_two_processes_small_ep2_then_tiny_layouts(corpus_cache, tmp_path):
    """One 2-process job: the small preset with ep=2 (state bytes and peak), then the tiny model under
    ep=2, pp=2, tp=2 and FSDP (state bytes)."""
    small = _small(corpus_cache, str(tmp_path / "small"), **{"parallel.ep": 2, "data.global_batch_size": 16})
    tiny = {name: ["model=tiny", *tiny_overrides(corpus_cache, str(tmp_path / name)), *extra]
            for name, extra in TINY_LAYOUTS.items()}
    per_rank = run_distributed(measure_real_steps, world_size=2, args=([small, *tiny.values()],), timeout_s=600)
    by_run = list(zip(*per_rank))  # [run][rank]
    _check(small, list(by_run[0]), check_peak=True)
    for (name, overrides), measured in zip(tiny.items(), by_run[1:]):
        try:
            _check(overrides, list(measured), check_peak=False)
        except AssertionError as exc:
            raise AssertionError(f"tiny {name}: {exc}") from None
