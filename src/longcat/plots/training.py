"""Figures drawn from a run's ``metrics.jsonl`` alone (no wandb needed).

- ``loss.png``: training loss (and its parts) and validation loss over steps;
- ``ffn_experts_per_token.png``: per MoE layer, the average FFN experts per token over steps, with the
  target K_e when the run's config is known;
- ``expert_load.png``: a layer x expert heatmap of the expert load (assignments per token) averaged
  over the last 20% of steps;
- ``stability.png`` (when logged): R_g, router cosine similarity, LB / z losses, last-hidden norm
  (``longcat.plots.stability``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from longcat.plots.metrics import layers_with, read_metrics, save_figure, series
from longcat.plots.stability import plot_stability

__all__ = ["plot_all"]


def plot_all(metrics_path: Path, out_dir: Path, *, target_ffn_experts: Optional[float] = None,
             records: Optional[list[dict]] = None) -> list[Path]:
    """Write the PNGs into ``out_dir``; returns their paths.

    ``records`` are those of ``metrics_path`` when already read (``read_metrics``).

    Raises:
        ValueError: for a bad metrics file (``read_metrics``).
        OSError: when ``out_dir`` or a PNG cannot be written.
    """
    import matplotlib  # lazily: only drawing needs it, and Agg must be selected before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if records is None:
        records = read_metrics(Path(metrics_path))
    config_path = Path(metrics_path).parent / "config.json"
    if target_ffn_experts is None and config_path.is_file():
        target_ffn_experts = json.loads(config_path.read_text()).get("moe", {}).get("expected_ffn_experts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("loss", "-"), ("loss/ce", "--"), ("val/loss", "o-")):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("LongCat-Flash training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for layer in layers_with(records, "ffn_experts_per_token"):
        steps, values = series(records, f"moe/layer{layer}/ffn_experts_per_token")
        ax.plot(steps, values, label=f"layer {layer}")
    if target_ffn_experts is not None:
        ax.axhline(target_ffn_experts, color="k", ls=":", label=f"target K_e={target_ffn_experts:g}")
        ax.axhspan(0.98 * target_ffn_experts, 1.02 * target_ffn_experts, color="k", alpha=0.08, label="K_e +- 2%")
    ax.set_xlabel("step")
    ax.set_ylabel("FFN experts per token")
    ax.set_title("Dynamic computation: average FFN experts per token")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, out_dir / "ffn_experts_per_token.png"))

    layers = layers_with(records, "expert_load")
    if layers:
        tail = records[int(len(records) * 0.8):] or records
        rows = []
        for layer in layers:
            loads = [r[f"moe/layer{layer}/expert_load"] for r in tail if f"moe/layer{layer}/expert_load" in r]
            rows.append(np.mean(np.asarray(loads, dtype=float), axis=0))
        heat = np.stack(rows)
        fig, ax = plt.subplots(figsize=(max(6, heat.shape[1] * 0.4), 1.5 + 0.5 * len(layers)))
        image = ax.imshow(heat, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax, label="assignments per token")
        ax.set_xlabel("FFN expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_title("Expert load (last 20% of steps)")
        written.append(save_figure(fig, out_dir / "expert_load.png"))
    stability = plot_stability(records, out_dir, metrics_path=Path(metrics_path))
    if stability is not None:
        written.append(stability)
    return written
