"""One metrics sink for console, JSONL and wandb (STYLE.md: metrics never go through log lines).

Only rank 0 writes. Scalars go everywhere; list-valued metrics (per-expert load vectors) go to JSONL
as lists and to wandb as histograms.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from longcat.atomic_files import write_text_atomic
from longcat.config.schema import LoggingConfig

logger = logging.getLogger(__name__)


class MetricsSink:
    """Writes step metrics to ``<out_dir>/metrics.jsonl``, a tqdm progress bar and wandb.

    Args:
        total_steps: for the progress bar's ETA.
        start_step: the first step this process will log (a resumed run starts mid-way).
        enabled: False on ranks other than 0 (every method is then a no-op).
    """

    def __init__(self, cfg: LoggingConfig, *, out_dir: Path, total_steps: int, start_step: int,
                 enabled: bool, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.cfg = cfg
        self.jsonl_path = out_dir / "metrics.jsonl"
        self._bar = None
        self._wandb = None
        self.wandb_dir: Optional[Path] = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run logs the steps after its checkpoint again; a fresh one (step 0) logs everything
        drop_records_after(self.jsonl_path, start_step if start_step > 0 else -1)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, mininterval=1.0)
        if cfg.wandb.mode != "disabled":
            self._wandb = _init_wandb(cfg, out_dir=out_dir, run_config=run_config)
            if self._wandb is not None:
                self.wandb_dir = Path(self._wandb.dir).parent

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            postfix = {}
            for key, short in (("loss", "loss"), ("val/loss", "val_loss"), ("tokens_per_s", "tokens_per_s"),
                               ("lr", "lr"), ("moe/ffn_experts_per_token", "ffn_per_tok"), ("moe/rg_max", "rg")):
                if key in record and isinstance(record[key], (int, float)):
                    postfix[short] = f"{record[key]:.4g}"
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        if self._wandb is not None:
            import wandb

            payload = {}
            for key, value in record.items():
                if isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value):
                    payload[key] = wandb.Histogram(value)
                elif isinstance(value, (int, float)) and key != "step":
                    payload[key] = value
            self._wandb.log(payload, step=step)

    def write(self, message: str) -> None:
        """A line of human-facing text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def rewind(self, step: int) -> None:
        """Forget what was logged after ``step`` (an SDC rollback trains those steps again): the JSONL
        records past it are dropped and the progress bar moves back. wandb keeps its points (it
        accepts no step lower than one it has seen)."""
        if not self.enabled:
            return
        self._jsonl.close()
        drop_records_after(self.jsonl_path, step)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _init_wandb(cfg: LoggingConfig, *, out_dir: Path, run_config: Optional[dict]):
    try:
        import wandb
    except ImportError:
        logger.warning("wandb is not installed; logging.wandb.mode=%s ignored", cfg.wandb.mode)
        return None
    wandb_dir = Path(cfg.wandb.dir) if cfg.wandb.dir else out_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or None, mode=cfg.wandb.mode,
                      dir=str(wandb_dir), config=run_config, resume="allow")


def drop_records_after(path: Path, step: int) -> int:
    """Remove the records of steps after ``step`` from a metrics JSONL (atomically); return how many.

    A run that resumes from the checkpoint of step N trains N+1, ... again; without this the lines
    an interrupted run wrote past N would appear twice. A torn last line (a crash mid-write) goes too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped
