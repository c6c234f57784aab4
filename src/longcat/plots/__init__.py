"""Figures from a run's ``metrics.jsonl`` alone (no wandb needed): ``plot_all`` (``training``: loss,
FFN experts per token, expert load; ``stability``: the stability suite's curves) and the budget
summary of ``tools/plot_metrics.py``."""

from longcat.plots.metrics import read_metrics
from longcat.plots.stability import (
    budget_summary,
    format_budget_summary,
    plot_stability,
)
from longcat.plots.training import plot_all

__all__ = ["budget_summary", "format_budget_summary", "plot_all", "plot_stability", "read_metrics"]
