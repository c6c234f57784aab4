"""Cost of the SDC replay check under pipeline parallelism and under DeepSpeed (2 processes, gloo).

``longcat.bench.sdc`` measures the replay in one process. Here the same recipe
(``recipes/pretrain.yaml``, ``determinism.enabled=true``) runs on two ranks in two layouts whose
replay works differently (``train/sdc_check.py``):

- ``pp2-1f1b``: after the schedule's step the chosen micro-batch runs twice on its own through the
  stages (forward in stage order, backward in reverse, no overlap between the stages);
- ``dp2-deepspeed-z2``: the chosen micro-batch's gradient is taken once more with
  ``torch.autograd.grad`` beside the engine's backward, then replayed (forward + gradient).

Per layout one ``Trainer`` per rank alternates blocks of plain steps and steps with a replay
(``sdc.replay_interval`` switched between blocks on the live ``SDCMonitor``); per step the process
CPU time of the slower rank (the work) and the wall time (which also counts the stages waiting on
each other), medians. Overhead at interval N = (replay step - plain step) / (N x plain step).
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
from longcat.testing.distributed import run_distributed

LAYOUTS = {
    "pp2-1f1b": ("parallel.pp=2", "parallel.pp_schedule=1f1b"),
    "dp2-deepspeed-z2": ("parallel.dp=2", "parallel.dp_mode=deepspeed", "parallel.zero_stage=2"),
}
INTERVALS = (1, 10, 20, 100)


@dataclass(frozen=True)
class SDCLayoutBenchSettings:
    recipe: str = "pretrain"
    # 4 micro-batches of 4 per pipeline step (2 per dp rank under DeepSpeed)
    overrides: tuple[str, ...] = ("data.micro_batch_size=4",)
    rounds: int = 3  # alternations of (plain, replay) blocks
    steps_per_block: int = 3
    threads: int = 1  # one intra-op thread per rank: CPU time then measures work, not OpenMP spinning

    @classmethod
    def for_mode(cls, *, quick: bool) -> SDCLayoutBenchSettings:
        return cls(rounds=1, steps_per_block=1) if quick else cls()


def _rank_main(settings: SDCLayoutBenchSettings, layout: str, out_dir: str) -> dict[str, Any]:
    """One rank: alternate plain and replay blocks; per step (cpu_s, wall_s)."""
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.train.trainer import Trainer

    torch.set_num_threads(settings.threads)
    overrides = [f"train.out_dir={out_dir}", "train.eval_interval=0", "train.checkpoint_interval=0",
                 "determinism.enabled=true", "logging.wandb.mode=disabled", "logging.progress_bar=false",
                 *settings.overrides, *LAYOUTS[layout]]
    cfg, cfg_dict = compose_run_config(settings.recipe, overrides)
    if not Path(cfg.data.cache_dir).is_absolute():
        cfg.data.cache_dir = str(project_root() / cfg.data.cache_dir)
    validate_run_config(cfg, world_size=2)
    groups = ProcessGroups.build(ParallelDims.from_config(cfg.parallel, world_size=2))
    trainer = Trainer(cfg, groups=groups, config_dict=cfg_dict)

    def steps(n: int, interval: int) -> list[tuple[float, float]]:
        trainer.sdc.cfg.replay_interval = interval
        out = []
        for _ in range(n):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            trainer.train_step()
            out.append((time.process_time() - cpu0, time.perf_counter() - wall0))
        return out

    steps(2, 0)  # warm-up (schedules built, DeepSpeed buffers allocated)
    plain, replay = [], []
    for _ in range(settings.rounds):
        plain += steps(settings.steps_per_block, 0)
        replay += steps(settings.steps_per_block, 1)
    return {"plain": plain, "replay": replay, "accum": trainer.accum, "false_alarms": len(trainer.sdc.mismatches),
            "replays": trainer.sdc.num_checks["replay"]}


def _slower(ranks: list[dict], key: str, column: int) -> float:
    """Median over steps of the slower rank's value."""
    per_step = zip(*[[t[column] for t in r[key]] for r in ranks])
    return median([max(values) for values in per_step])


def run(*, quick: bool = False, settings: SDCLayoutBenchSettings | None = None) -> BenchResult:
    """Replay-check overhead under pp 2 and DeepSpeed ZeRO-2 dp 2; see the module doc."""
    s = settings or SDCLayoutBenchSettings.for_mode(quick=quick)
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    rows, cost_rows = [], []
    for layout in LAYOUTS:
        with tempfile.TemporaryDirectory(prefix="longcat-bench-sdc-layouts-") as tmp:
            ranks = run_distributed(_rank_main, world_size=2, args=(s, layout, tmp), timeout_s=1800)
        step_cpu, replay_cpu = _slower(ranks, "plain", 0), _slower(ranks, "replay", 0)
        step_wall, replay_wall = _slower(ranks, "plain", 1), _slower(ranks, "replay", 1)
        extra_cpu, extra_wall = max(replay_cpu - step_cpu, 0.0), max(replay_wall - step_wall, 0.0)
        key = layout.replace("-", "_")
        metrics.update({
            f"{key}_step_cpu_s": step_cpu, f"{key}_replay_step_cpu_s": replay_cpu,
            f"{key}_step_wall_s": step_wall, f"{key}_replay_step_wall_s": replay_wall,
            f"{key}_false_alarms": sum(r["false_alarms"] for r in ranks),
            f"{key}_replay_checks_run": ranks[0]["replays"],
            **{f"{key}_overhead_cpu_interval_{n}": extra_cpu / (n * step_cpu) for n in INTERVALS},
            **{f"{key}_overhead_wall_interval_{n}": extra_wall / (n * step_wall) for n in INTERVALS},
        })
        rows += [[layout, n, f"{100 * extra_cpu / (n * step_cpu):.2f}%"] for n in INTERVALS]
        cost_rows.append([layout, ranks[0]["accum"], f"{1e3 * step_cpu:.1f} / {1e3 * step_wall:.1f}",
                          f"{1e3 * replay_cpu:.1f} / {1e3 * replay_wall:.1f}",
                          f"{metrics[f'{key}_false_alarms']} (in {ranks[0]['replays']} replay checks)"])
    tables = [
        Table("Replay-check overhead by sdc.replay_interval (process CPU time of the slower rank)",
              ["layout", "interval", "overhead"], rows),
        Table("Where the time goes", ["layout", "micro-batches per rank and step", "plain step ms (CPU / wall)",
                                      "step with a replay ms (CPU / wall)", "false alarms"], cost_rows),
    ]
    notes = [
        f"recipe {s.recipe!r} with {list(s.overrides)}, determinism on, 2 ranks (gloo), {s.threads} torch thread(s) "
        f"per rank; {s.rounds} rounds of {s.steps_per_block} steps per variant.",
        "pp2-1f1b: the replay adds two isolated runs of one micro-batch through both stages, one stage at a time; "
        "each rank computes its stage twice more (CPU), and waits while the other stage computes (wall).",
        "Wall time is reported but not turned into an overhead: on a machine shared with other jobs (see the load "
        "average) it is dominated by waiting for a core, and the replay's serialisation under PP (each stage idle "
        "while the other computes its part of the isolated runs) needs an idle machine to show; expect about two "
        "micro-batches' forward + backward through all stages, one after the other, per replay.",
        "dp2-deepspeed-z2: the replay adds one backward (the first gradient by torch.autograd.grad beside the "
        "engine's backward) and one forward + backward of the chosen micro-batch.",
    ]
    return BenchResult(name="sdc_layouts",
                       title="SDC replay check under pipeline parallelism and DeepSpeed (2 processes)",
                       metrics=metrics, tables=tables, settings=dataclasses.asdict(s), notes=notes,
                       wall_s=time.perf_counter() - start)
