"""A small learning-rate sweep that checks hyperparameter transfer by width (arXiv 2509.01322 §3.1.1).

Sweep the LR of a proxy model (width ``proxy_hidden``) and of a target model ``factor`` x wider, on the
default corpus, with everything else fixed (depth, experts, batch, steps). The transferred LR for the
target's hidden and unembedding matrices is the proxy's best LR / s (Table 1): the check is whether
that lands within 2x of the target's own best LR.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

from longcat.config.compose import compose_run_config
from longcat.config.validate import validate as validate_run_config
from longcat.train.trainer import Trainer


@dataclasses.dataclass
class SweepResult:
    width: int
    lrs: list
    final_losses: list

    @property
    def best_lr(self) -> float:
        finite = [(loss, lr) for loss, lr in zip(self.final_losses, self.lrs) if math.isfinite(loss)]
        return min(finite)[1] if finite else float("nan")


def _final_loss(overrides: Sequence[str]) -> float:
    cfg, cfg_dict = compose_run_config("pretrain", list(overrides))
    validate_run_config(cfg, world_size=1)
    trainer = Trainer(cfg, config_dict=cfg_dict)
    losses = [trainer.train_step().loss.ce for _ in range(cfg.train.steps)]
    tail = losses[-max(1, len(losses) // 5):]
    return sum(tail) / len(tail)


def width_overrides(hidden: int) -> list[str]:
    """Model overrides that scale every width with ``hidden`` (tiny preset at hidden 128)."""
    scale = hidden / 128
    return [f"model.hidden_size={hidden}", f"model.ffn_hidden_size={int(256 * scale)}",
            f"model.q_lora_rank={int(64 * scale)}", f"model.kv_lora_rank={int(32 * scale)}",
            f"model.expert_ffn_hidden_size={int(64 * scale)}"]


def _fixed_overrides(steps: int) -> list[str]:
    return [f"train.steps={steps}", "optim.warmup_steps=5", "train.eval_interval=0", "train.checkpoint_interval=0",
            "logging.wandb.mode=disabled", "logging.progress_bar=false", "determinism.enabled=false",
            "sdc.replay_interval=0", "sdc.replica_interval=0"]


def multirun_commands(*, proxy_hidden: int, factor: int, lrs: Sequence[float], steps: int, out_dir: Path,
                      extra: Sequence[str] = ()) -> list[str]:
    """The same sweep as ``longcat-train -m`` commands, one per width (a width sets several keys together):
    job ``i`` of width ``h`` trains ``lrs[i]`` in ``out_dir/w<h>/<i>``; its ``metrics.jsonl`` holds the
    ``loss/ce`` values ``run_sweep`` compares (the mean of the last fifth of the steps)."""
    return [" ".join(["longcat-train", "-m", "recipe=pretrain", *width_overrides(hidden),
                      "optim.lr=" + ",".join(f"{lr:g}" for lr in lrs), *_fixed_overrides(steps),
                      f"train.out_dir={out_dir / f'w{hidden}'}", *extra])
            for hidden in (proxy_hidden, proxy_hidden * factor)]


def run_sweep(*, proxy_hidden: int, factor: int, lrs: Sequence[float], steps: int, out_dir: Path,
              extra: Sequence[str] = ()) -> dict:
    """Sweep ``lrs`` at both widths; returns (and writes ``out_dir/transfer_sweep.json``) the report."""
    results = []
    for hidden in (proxy_hidden, proxy_hidden * factor):
        finals = []
        for lr in lrs:
            overrides = [*width_overrides(hidden), f"optim.lr={lr}", *_fixed_overrides(steps),
                         f"train.out_dir={out_dir / f'w{hidden}_lr{lr:g}'}", *extra]
            finals.append(_final_loss(overrides))
            print(f"width {hidden} lr {lr:g}: final loss {finals[-1]:.4f}", flush=True)
        results.append(SweepResult(width=hidden, lrs=list(lrs), final_losses=finals))
    proxy, target = results
    transferred = proxy.best_lr / factor
    ratio = transferred / target.best_lr if target.best_lr == target.best_lr else float("nan")
    report = {"proxy": dataclasses.asdict(proxy), "target": dataclasses.asdict(target),
              "proxy_best_lr": proxy.best_lr, "target_best_lr": target.best_lr, "width_factor": factor,
              "transferred_lr": transferred, "transferred_over_best": ratio,
              "within_2x": bool(0.5 <= ratio <= 2.0)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transfer_sweep.json").write_text(json.dumps(report, indent=1))
    return report
