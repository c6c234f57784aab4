"""``stability.png``: the stability suite's curves from a run's ``metrics.jsonl`` (arXiv 2509.01322 §3.1.3).

Four panels over steps, each drawn when its metrics are present (``longcat.train.stability`` names):
R_g per MoE layer (Eq. 9, log scale, with ``moe.rg_threshold``; dots, it is measured every
``moe.router_health_interval`` steps), the router rows' mean pairwise cosine similarity per layer
(with ``moe.router_collapse_threshold``), the auxiliary losses ``loss/lb`` and ``loss/z`` (log
scale) with the alpha in use, and the mean L2 norm of the last pre-norm hidden state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from longcat.plots.metrics import layers_with, save_figure, series

__all__ = ["budget_summary", "format_budget_summary", "plot_stability"]


def _moe_config(metrics_path: Path) -> dict:
    config_path = Path(metrics_path).parent / "config.json"
    if not config_path.is_file():
        return {}
    return json.loads(config_path.read_text()).get("moe", {}) or {}


def plot_stability(records: list[dict], out_dir: Path, *, metrics_path: Path) -> Optional[Path]:
    """Write ``out_dir/stability.png``; None when the records hold none of its metrics."""
    import matplotlib.pyplot as plt  # lazily: plot_all selects the Agg backend first

    rg_layers = layers_with(records, "rg")
    cos_layers = layers_with(records, "router_cosine_similarity")
    aux = [key for key in ("loss/lb", "loss/z") if series(records, key)[0]]
    hidden = series(records, "hidden/last_l2_norm")
    if not (rg_layers or cos_layers or hidden[0]):
        return None
    moe = _moe_config(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    ax_rg, ax_cos, ax_aux, ax_hidden = axes.flat

    for layer in rg_layers:
        steps, values = series(records, f"moe/layer{layer}/rg")
        # Log scale: a measurement of exactly 0 (Eq. 4's groups exactly balanced) is left out.
        positive = [(s, v) for s, v in zip(steps, values) if v > 0]
        if positive:
            ax_rg.plot(*zip(*positive), "o-", markersize=3, lw=0.8, label=f"layer {layer}")
    if "rg_threshold" in moe:
        ax_rg.axhline(moe["rg_threshold"], color="r", ls=":", label=f"threshold {moe['rg_threshold']:g}")
    ax_rg.set_yscale("log")
    ax_rg.set_title("R_g = ||alpha dL_LB/dP|| / ||dL_LM/dP|| (Eq. 9)")

    for layer in cos_layers:
        steps, values = series(records, f"moe/layer{layer}/router_cosine_similarity")
        ax_cos.plot(steps, values, label=f"layer {layer}")
    if "router_collapse_threshold" in moe:
        ax_cos.axhline(moe["router_collapse_threshold"], color="r", ls=":",
                       label=f"collapse warning {moe['router_collapse_threshold']:g}")
    ax_cos.set_title("router rows: mean pairwise cosine similarity")

    for key in aux:
        steps, values = series(records, key)
        positive = [(s, v) for s, v in zip(steps, values) if v > 0]
        if positive:
            ax_aux.plot(*zip(*positive), label=key)
    ax_aux.set_yscale("log")
    ax_aux.set_title("auxiliary losses (in the objective)")
    steps, alpha = series(records, "moe/lb_coef")
    if steps and len(set(alpha)) > 1:
        twin = ax_aux.twinx()
        twin.plot(steps, alpha, "k--", lw=1, label="alpha (auto)")
        twin.set_ylabel("alpha")
        twin.legend(loc="lower left")

    if hidden[0]:
        ax_hidden.plot(*hidden, color="tab:purple", label="hidden/last_l2_norm")
    ax_hidden.set_title("last hidden state (pre-norm): mean L2 norm per token")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle("LongCat-Flash stability suite (§3.1.3)")
    return save_figure(fig, Path(out_dir) / "stability.png")


def budget_summary(records: list[dict], *, target: float, tail_fraction: float = 0.2) -> list[dict]:
    """Per MoE layer, the average FFN experts per token over the last ``tail_fraction`` of the logged
    steps against the target K_e: ``mean``, ``mean_dev_pct`` (signed), ``max_dev_pct`` (worst single
    step), ``within_2pct`` (fraction of steps within 2%), ``start`` (the first logged step's value)
    and ``load_max_over_mean`` (mean over the window of the per-step max/mean FFN-expert load)."""
    out = []
    for layer in layers_with(records, "ffn_experts_per_token"):
        steps, values = series(records, f"moe/layer{layer}/ffn_experts_per_token")
        if not values:
            continue
        tail = values[int(len(values) * (1 - tail_fraction)):] or values
        devs = [(v - target) / target * 100 for v in tail]
        _, loads = series(records, f"moe/layer{layer}/load_max_over_mean")
        loads = loads[int(len(loads) * (1 - tail_fraction)):]
        out.append({
            "layer": layer, "window": (steps[len(values) - len(tail)], steps[-1]), "start": values[0],
            "mean": sum(tail) / len(tail), "mean_dev_pct": sum(devs) / len(devs),
            "max_dev_pct": max(abs(d) for d in devs), "within_2pct": sum(abs(d) <= 2 for d in devs) / len(devs),
            "load_max_over_mean": sum(loads) / len(loads) if loads else float("nan"),
        })
    return out


def format_budget_summary(rows: list[dict], *, target: float) -> str:
    lines = [f"FFN experts per token vs K_e={target:g}, last 20% of steps:"]
    for r in rows:
        lines.append(
            f"  layer {r['layer']}: steps {r['window'][0]}-{r['window'][1]}: mean {r['mean']:.3f} "
            f"({r['mean_dev_pct']:+.2f}%), worst step {r['max_dev_pct']:.1f}% off, "
            f"{100 * r['within_2pct']:.0f}% of steps within 2%; start {r['start']:.3f}; "
            f"load max/mean {r['load_max_over_mean']:.2f}")
    return "\n".join(lines)
