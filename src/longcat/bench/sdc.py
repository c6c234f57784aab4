"""Cost of the SDC checks (``train/sdc_check.py``) on the default run: ``recipes/pretrain.yaml``, one process.

The replay check re-runs one micro-batch's forward and backward every ``sdc.replay_interval`` steps
and hashes every gradient twice, so its cost per check is about one micro-batch of compute (the
pretrain recipe has 2 per step) plus two checksum passes; the overhead at interval N is that extra
time over N ordinary steps.

One ``Trainer`` (``determinism.enabled=true``, no eval, no checkpoints) runs all variants, alternating
in rounds so that a slow spell of a shared machine hits each alike (the replay interval is switched
between rounds on the live ``SDCMonitor``; determinism on/off likewise):

- per-step times: plain steps, steps with a replay (interval 1), plain steps with PyTorch's
  deterministic mode off; medians. The extra time of a replay gives the overhead at every interval:
  ``extra / (N * plain step)`` for N = 1, 10, 100, and the smallest of ``CANDIDATE_INTERVALS`` at
  or under the 5% target (pick a default with some margin: run-to-run noise is about +-10% of the
  extra time on a shared machine);
- directly measured, for interval 10: blocks of 10 steps with one replay against blocks of 10
  plain steps (noisier: the effect is a few percent);
- the checksum alone: all gradients (what one replay hashes twice), all parameters (what the
  cross-replica check hashes, before its all-gather), in ms and GB/s.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longcat.bench.common import BenchResult, Table, median
from longcat.config.compose import compose_run_config, project_root
from longcat.config.validate import validate as validate_run_config
from longcat.train.sdc import checksums
from longcat.train.trainer import Trainer

CANDIDATE_INTERVALS = (1, 2, 5, 10, 20, 25, 50, 100, 200)
TARGET_OVERHEAD = 0.05


@dataclass(frozen=True)
class SDCBenchSettings:
    recipe: str = "pretrain"
    overrides: tuple[str, ...] = ()  # extra Hydra overrides (tests point the data at their own corpus)
    rounds: int = 4  # alternations of (plain, replay, deterministic-off) blocks
    steps_per_block: int = 3
    interval_blocks: int = 2  # alternations of (10 steps with one replay, 10 plain steps)
    checksum_repeats: int = 5
    # One intra-op thread: on a shared machine the process CPU time of a step is then a faithful
    # measure of its work (with 2+ threads, OpenMP spin-waits under load inflate it several-fold).
    threads: int = 1

    @classmethod
    def for_mode(cls, *, quick: bool) -> SDCBenchSettings:
        return cls(rounds=1, steps_per_block=1, interval_blocks=0, checksum_repeats=1) if quick else cls()


def _trainer(s: SDCBenchSettings, out_dir: str):

    overrides = [f"train.out_dir={out_dir}", "train.eval_interval=0", "train.checkpoint_interval=0",
                 "determinism.enabled=true", "logging.wandb.mode=disabled", "logging.progress_bar=false",
                 *s.overrides]
    cfg, cfg_dict = compose_run_config(s.recipe, overrides)
    if not Path(cfg.data.cache_dir).is_absolute():
        cfg.data.cache_dir = str(project_root() / cfg.data.cache_dir)
    validate_run_config(cfg, world_size=1)
    return Trainer(cfg, config_dict=cfg_dict), cfg


def _timed_steps(trainer, n: int, *, replay_interval: int, deterministic: bool) -> list[tuple[float, float]]:
    """(wall_s, cpu_s) of each of ``n`` steps with the given replay interval and deterministic mode."""
    trainer.sdc.cfg.replay_interval = replay_interval
    torch.use_deterministic_algorithms(deterministic)
    out = []
    for _ in range(n):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        out.append((time.perf_counter() - wall0, time.process_time() - cpu0))
    return out


def _checksum_ms(named: list[tuple[str, torch.Tensor]], repeats: int) -> float:

    checksums(named)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        checksums(named)
        times.append(time.perf_counter() - start)
    return median(times) * 1e3


def _interval_blocks(trainer, s: SDCBenchSettings) -> float:
    """Measured overhead at interval 10: alternate 10 steps holding one replay with 10 plain steps."""
    with_replay, plain = [], []
    for _ in range(s.interval_blocks):
        while (trainer.step + 1) % 10 != 1:  # a block of 10 holds exactly one multiple of 10
            _timed_steps(trainer, 1, replay_interval=0, deterministic=True)
        with_replay.append(sum(t[1] for t in _timed_steps(trainer, 10, replay_interval=10, deterministic=True)))
        plain.append(sum(t[1] for t in _timed_steps(trainer, 10, replay_interval=0, deterministic=True)))
    return sum(with_replay) / sum(plain) - 1 if plain else float("nan")


def run(*, quick: bool = False, settings: SDCBenchSettings | None = None) -> BenchResult:
    """Replay-check overhead at intervals 1, 10, 100 and the checksum cost; see the module doc."""
    s = settings or SDCBenchSettings.for_mode(quick=quick)
    start = time.perf_counter()
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory(prefix="longcat-bench-sdc-") as tmp:
        trainer, cfg = _trainer(s, tmp)
        try:
            _timed_steps(trainer, 2, replay_interval=0, deterministic=True)  # warm-up
            plain, replay, nondet = [], [], []
            for _ in range(s.rounds):
                plain += _timed_steps(trainer, s.steps_per_block, replay_interval=0, deterministic=True)
                replay += _timed_steps(trainer, s.steps_per_block, replay_interval=1, deterministic=True)
                nondet += _timed_steps(trainer, s.steps_per_block, replay_interval=0, deterministic=False)
            measured_10 = _interval_blocks(trainer, s)
            grads = [(p.name, p.param.grad) for p in trainer.parallel.placements if p.param.grad is not None]
            params = [(p.name, p.param) for p in trainer.parallel.placements]
            grad_ms = _checksum_ms(grads, s.checksum_repeats)
            param_ms = _checksum_ms(params, s.checksum_repeats)
            mismatches, replays = len(trainer.sdc.mismatches), trainer.sdc.num_checks["replay"]
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(was_threads)
    grad_bytes = sum(g.numel() * g.element_size() for _, g in grads)
    param_bytes = sum(p.numel() * p.element_size() for _, p in params)
    step_s = median([t[1] for t in plain])
    replay_step_s = median([t[1] for t in replay])
    extra_s = max(replay_step_s - step_s, 0.0)
    overhead = {n: extra_s / (n * step_s) for n in CANDIDATE_INTERVALS}
    smallest_ok = next((n for n in CANDIDATE_INTERVALS if overhead[n] <= TARGET_OVERHEAD), CANDIDATE_INTERVALS[-1])
    metrics: dict[str, Any] = {
        "step_s": step_s,
        "replay_step_s": replay_step_s,
        "replay_extra_s": extra_s,
        "overhead_interval_1": overhead[1],
        "overhead_interval_10": overhead[10],
        "overhead_interval_100": overhead[100],
        "measured_overhead_interval_10": measured_10,
        "smallest_interval_within_5pct": smallest_ok,
        "overhead_at_smallest_interval_within_5pct": overhead[smallest_ok],
        "checksum_grads_ms": grad_ms,
        "checksum_grads_gb_per_s": grad_bytes / (grad_ms / 1e3) / 1e9,
        "checksum_params_ms": param_ms,
        "checksum_share_of_replay_extra": 2 * grad_ms / 1e3 / extra_s if extra_s else float("nan"),
        "deterministic_mode_overhead": step_s / median([t[1] for t in nondet]) - 1,
        "false_alarms": mismatches,
        "replay_checks_run": replays,
        "step_wall_s": median([t[0] for t in plain]),
        "replay_step_wall_s": median([t[0] for t in replay]),
    }
    rows = [[n, f"{100 * overhead[n]:.2f}%", "measured directly too" if n == 10 and s.interval_blocks else ""]
            for n in (1, 10, 100)]
    tables = [
        Table("Replay-check overhead by sdc.replay_interval (process CPU time)", ["interval", "overhead", "note"],
              rows + [[smallest_ok, f"{100 * overhead[smallest_ok]:.2f}%", "smallest interval at or under 5%"]]),
        Table("Where the time goes", ["quantity", "value"], [
            ["training step (determinism on, no check)", f"{1e3 * step_s:.1f} ms"],
            ["step with a replay check", f"{1e3 * replay_step_s:.1f} ms (+{1e3 * extra_s:.1f} ms)"],
            ["interval 10, measured in blocks of 10 steps", f"{100 * measured_10:.2f}%"],
            ["checksum of all gradients (a replay does it twice)",
             f"{grad_ms:.2f} ms ({metrics['checksum_grads_gb_per_s']:.2f} GB/s, {grad_bytes / 2**20:.1f} MiB)"],
            ["checksum of all parameters (cross-replica check, before its all-gather)",
             f"{param_ms:.2f} ms ({param_bytes / 2**20:.1f} MiB)"],
            ["PyTorch deterministic mode vs off", f"{100 * metrics['deterministic_mode_overhead']:+.2f}%"],
            ["false alarms over the run", f"{mismatches} (in {replays} replay checks)"],
        ]),
    ]
    notes = [f"recipe {s.recipe!r} ({cfg.data.micro_batch_size} x {cfg.data.seq_length} micro-batches, "
             f"{trainer.accum} per step), one process, {s.threads or was_threads} torch thread(s); "
             f"{s.rounds} rounds of {s.steps_per_block} steps per variant, medians of process CPU time per step.",
             "Overhead at interval N = (replay step - plain step) / (N x plain step); the replay re-runs 1 of "
             f"the step's {trainer.accum} micro-batches, so its cost is roughly 1/{trainer.accum} of a step plus "
             "two checksum passes over the gradients. With more micro-batches per step (production runs "
             "accumulate many) the same check costs proportionally less."]
    return BenchResult(name="sdc", title="SDC replay check: overhead by interval, checksum cost", metrics=metrics,
                       tables=tables, settings=dataclasses.asdict(s), notes=notes, wall_s=time.perf_counter() - start)

