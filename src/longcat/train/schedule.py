"""Learning-rate schedules as multipliers of each parameter group's base LR.

Warmup is linear from 0 (step 0 trains at lr / warmup_steps); a warmup longer than the run is shortened
to a tenth of it (``effective_warmup_steps``), with a warning. ``warmup_cosine`` decays by a half cosine
to ``min_lr_ratio``; ``wsd`` (warmup-stable-decay) holds the peak and decays linearly over the last
``decay_fraction`` of the steps. The LongCat-Flash report (arXiv 2509.01322) gives no schedule (§3.1.3
"not given"): these are the common choices, configurable.
"""

from __future__ import annotations

import logging
import math

import torch

from longcat.config.schema import LRSchedule, OptimConfig

logger = logging.getLogger(__name__)
SHORT_RUN_WARMUP_FRACTION = 0.1


def effective_warmup_steps(cfg: OptimConfig, *, total_steps: int) -> int:
    """``optim.warmup_steps``, or, when it exceeds ``train.steps`` (a short run with the default warmup),
    ``SHORT_RUN_WARMUP_FRACTION`` of the steps (rounded down), so the run still reaches its peak LR."""
    if cfg.warmup_steps <= total_steps:
        return cfg.warmup_steps
    return int(SHORT_RUN_WARMUP_FRACTION * total_steps)


def lr_multiplier(step: int, *, cfg: OptimConfig, total_steps: int) -> float:
    """The LR multiplier in [min_lr_ratio, 1] for optimizer step ``step`` (0-based)."""
    warmup = effective_warmup_steps(cfg, total_steps=total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    schedule = LRSchedule(cfg.schedule)
    if schedule is LRSchedule.constant:
        return 1.0
    floor = cfg.min_lr_ratio
    if schedule is LRSchedule.warmup_cosine:
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * max(0.0, 1 - (step - decay_start) / decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, *, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (last_epoch) is checkpointed with the run. Warns when the warmup is
    shortened to fit the run (``effective_warmup_steps``), or dropped (a run under 10 steps)."""
    warmup = effective_warmup_steps(cfg, total_steps=total_steps)
    if warmup == 0 and cfg.warmup_steps > 0:
        logger.warning("optim.warmup_steps=%d exceeds train.steps=%d: no warmup (a run this short keeps none); "
                       "set optim.warmup_steps to choose", cfg.warmup_steps, total_steps)
    elif warmup != cfg.warmup_steps:
        logger.warning("optim.warmup_steps=%d exceeds train.steps=%d: warming up over %d steps (%.0f%% of the run) "
                       "instead; set optim.warmup_steps to choose", cfg.warmup_steps, total_steps, warmup,
                       100 * SHORT_RUN_WARMUP_FRACTION)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg=cfg, total_steps=total_steps)
    )
