"""One metrics sink for console, JSONL, wandb and TensorBoard (metrics never go through log lines).

Only rank 0 writes. Every logged step prints one Megatron-style console line (TTY or not: a cluster
job's log has one line per ``logging.log_interval`` steps). Scalars go everywhere; list-valued metrics
(per-expert load vectors, ``moe/layer{L}/expert_load``) go to JSONL as lists and, so that each expert
keeps its identity, to wandb / TensorBoard as one scalar per expert (``moe/layer{L}/expert_{E}``) when
there are at most ``PER_EXPERT_SCALARS_MAX`` experts, else to wandb as a layers x experts heatmap image.

The wandb run id is kept in ``<out_dir>/wandb_run_id`` and reused when the run resumes (a killed and
resumed run is one wandb run, one curve); TensorBoard drops the events past the resumed step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

from longcat.atomic_files import write_text_atomic
from longcat.config.modes import WandbMode
from longcat.config.schema import LoggingConfig

logger = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
TENSORBOARD_DIR = "tensorboard"
PER_EXPERT_SCALARS_MAX = 64
HEATMAP_EVERY_STEPS = 100
# wandb.init types its mode as string literals
_WANDB_INIT_MODE: dict[WandbMode, Literal["online", "offline", "disabled"]] = {
    WandbMode.online: "online", WandbMode.offline: "offline", WandbMode.disabled: "disabled",
}
# (metric, label, format) of the console line, in order; a metric absent from the step is left out.
CONSOLE_FIELDS = (
    ("loss", "loss", "{:.4f}"),
    ("val/loss", "val loss", "{:.4f}"),
    ("lr", "lr", "{:.3e}"),
    ("grad_norm", "grad norm", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("throughput/tflops_per_device", "TFLOP/s/device", "{:.3g}"),
    ("throughput/mfu", "MFU", "{:.1%}"),
    ("memory/max_gb", "max mem GB", "{:.2f}"),
    ("nonfinite/skipped_steps", "skipped", "{:.0f}"),
    ("moe/ffn_experts_per_token", "FFN experts/token", "{:.2f}"),
)


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
        self.total_steps = total_steps
        self.jsonl_path = out_dir / "metrics.jsonl"
        self._bar = None
        self._wandb = None
        self._tensorboard = None
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
            self._wandb = _init_wandb(cfg, out_dir=out_dir, run_config=run_config, start_step=start_step)
            if self._wandb is not None:
                self.wandb_dir = Path(self._wandb.dir).parent
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR),
                                              purge_step=start_step + 1 if start_step > 0 else None)

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
        if "loss" in record:  # a training step (not the initial validation alone)
            self.write(console_line(step, self.total_steps, record))
        scalars = scalar_metrics(record)
        if self._wandb is not None:
            self._wandb.log({**scalars, **self._wandb_images(step, record)}, step=step)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, global_step=step)

    def _wandb_images(self, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """Per-expert load of every layer as one [layers, experts] heatmap, when too many experts for scalars."""
        loads = [v for k, v in sorted(record.items()) if k.endswith("/expert_load") and isinstance(v, list)]
        if not loads or len(loads[0]) <= PER_EXPERT_SCALARS_MAX or step % HEATMAP_EVERY_STEPS:
            return {}
        import numpy as np
        import wandb

        load_LE = np.asarray(loads, dtype=np.float32)
        pixels = (255 * load_LE / max(float(load_LE.max()), 1e-9)).astype(np.uint8)
        return {"moe/expert_load_heatmap": wandb.Image(pixels, caption="rows: layers, columns: experts")}

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
        if self._tensorboard is not None:
            self._tensorboard.close()


def console_line(step: int, total_steps: int, record: dict[str, Any]) -> str:
    """One Megatron-style line: `` step 10/500 | loss 6.2345 | lr 3.000e-03 | ...`` (``CONSOLE_FIELDS``)."""
    parts = [f" step {step}/{total_steps}"]
    for key, label, fmt in CONSOLE_FIELDS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


def scalar_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a record for wandb / TensorBoard: scalars as they are, per-expert vectors
    (``.../expert_load``, at most ``PER_EXPERT_SCALARS_MAX`` long) as ``.../expert_{E}`` scalars."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = value
        elif (key.endswith("/expert_load") and isinstance(value, list)
              and 0 < len(value) <= PER_EXPERT_SCALARS_MAX and all(isinstance(x, (int, float)) for x in value)):
            prefix = key[: -len("expert_load")]
            out.update({f"{prefix}expert_{e}": x for e, x in enumerate(value)})
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _init_wandb(cfg: LoggingConfig, *, out_dir: Path, run_config: Optional[dict], start_step: int):
    """``wandb.init`` with the run id kept in ``<out_dir>/wandb_run_id``: a resumed run (start_step > 0)
    continues the same wandb run; a fresh one starts a new id."""
    try:
        import wandb
    except ImportError:
        logger.warning("wandb is not installed; logging.wandb.mode=%s ignored", cfg.wandb.mode)
        return None
    wandb_dir = Path(cfg.wandb.dir) if cfg.wandb.dir else out_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:16]  # wandb ids: lowercase letters and digits
        write_text_atomic(id_file, run_id + "\n")
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or None, mode=_WANDB_INIT_MODE[cfg.wandb.mode],
                      dir=str(wandb_dir), config=run_config, id=run_id, resume="allow")


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
