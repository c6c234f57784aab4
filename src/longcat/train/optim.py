"""AdamW with per-group weight decay and width-transferred learning rates.

Parameter groups (names from ``longcat.model.init.param_groups_names``):
- no weight decay on norms, biases (incl. the expert bias, which is a buffer and never optimised) and
  embeddings;
- hyperparameter transfer (arXiv 2509.01322 §3.1.1, Table 1): with width factor
  ``s = hidden_size / proxy_hidden_size`` the hidden and unembedding LRs are divided by ``s``; the
  embedding LR is unchanged. Router and norm parameters follow the hidden rule (documented choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from longcat.config.schema import ModelConfig, OptimConfig
from longcat.model.init import param_groups_names

NO_DECAY_KINDS = ("norm", "bias", "embedding")
LR_SCALED_KINDS = ("hidden", "unembedding", "router", "norm", "bias")


@dataclass(frozen=True)
class GroupRule:
    kind: str
    lr: float
    weight_decay: float


def width_scale(model_cfg: ModelConfig, optim_cfg: OptimConfig) -> float:
    """s of §3.1.1: target width over proxy width (1.0 when transfer is off)."""
    if not optim_cfg.proxy_hidden_size:
        return 1.0
    return model_cfg.hidden_size / optim_cfg.proxy_hidden_size


def group_rules(optim_cfg: OptimConfig, *, scale: float) -> dict[str, GroupRule]:
    """The LR and weight decay each parameter kind gets (Table 1 of the paper for the LR)."""
    rules = {}
    for kind in ("embedding", "hidden", "unembedding", "router", "norm", "bias"):
        lr = optim_cfg.lr / scale if kind in LR_SCALED_KINDS else optim_cfg.lr
        wd = 0.0 if kind in NO_DECAY_KINDS else optim_cfg.weight_decay
        rules[kind] = GroupRule(kind=kind, lr=lr, weight_decay=wd)
    return rules


def build_optimizer(model: torch.nn.Module, *, optim_cfg: OptimConfig,
                    model_cfg: ModelConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, one group per parameter kind.

    Raises:
        ValueError: a trainable parameter whose kind the model does not classify.
    """
    kinds = param_groups_names(model)
    rules = group_rules(optim_cfg, scale=width_scale(model_cfg, optim_cfg))
    grouped: dict[str, list[torch.nn.Parameter]] = {k: [] for k in rules}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = kinds.get(name)
        if kind not in rules:
            raise ValueError(f"parameter {name!r} has no optimizer group (kind {kind!r})")
        grouped[kind].append(param)
    groups = [
        {"params": params, "lr": rules[k].lr, "weight_decay": rules[k].weight_decay, "kind": k}
        for k, params in grouped.items() if params
    ]
    # torch's fused AdamW kernel: one pass over each parameter and its two moments instead of ~8
    # elementwise passes (6.5x faster on CPU at 90M fp32 parameters), no per-parameter host read of
    # the step count, and deterministic. For floating-point parameters (DTensors included) on CPU or CUDA.
    # The kernel runs per parameter group and cannot mix DTensors with plain tensors (FSDP2 leaving one
    # parameter whole, e.g. ZB-V's embedding shared by two stage roots): such a run keeps foreach.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for params in grouped.values() for p in params) and not any(
        len({isinstance(p, DTensor) for p in params}) > 1 for params in grouped.values())
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             fused=fused or None)
