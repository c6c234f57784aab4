"""Weight initialisation and parameter groups (arXiv 2509.01322 §3.1.1 hyperparameter transfer).

Per group (std of a zero-mean normal unless stated), with width factor s = ``width_scale``
(hidden_target / hidden_proxy; Table 1: hidden and unembedding init *variance* / s):

    embedding    embed_tokens                      initializer_range
    hidden       every other matrix (MLA, FFNs,    initializer_range / sqrt(s)
                 experts, MTP eh_proj)
    unembedding  lm_head                           initializer_range / sqrt(s)
    router       mlp.router.classifier             initializer_range
    norm         RMSNorm weights                   1
    bias         Linear biases (attention_bias)    0     (and the expert-bias buffer: 0)

The reference implementation initialises every matrix with initializer_range (s = 1).
"""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

from longcat.config.schema import ModelConfig


class ParamGroup(str, enum.Enum):
    """Optimizer / init group of a parameter (compares equal to its string value)."""

    EMBEDDING = "embedding"
    HIDDEN = "hidden"
    UNEMBEDDING = "unembedding"
    NORM = "norm"
    ROUTER = "router"
    BIAS = "bias"


def param_group(name: str, param: torch.Tensor) -> ParamGroup:
    """Group of one parameter from its state-dict name (wrapper prefixes such as ``module.`` are fine)."""
    parts = name.split(".")
    if parts[-1] == "bias":
        return ParamGroup.BIAS
    if param.ndim == 1:  # every 1-D weight of the model is an RMSNorm scale
        return ParamGroup.NORM
    if "embed_tokens" in parts:
        return ParamGroup.EMBEDDING
    if "lm_head" in parts:
        return ParamGroup.UNEMBEDDING
    if "router" in parts and "classifier" in parts:
        return ParamGroup.ROUTER
    return ParamGroup.HIDDEN


def param_groups_names(model: nn.Module) -> dict[str, str]:
    """Every (deduplicated) parameter name of ``model`` -> its ParamGroup. Weight decay usually skips
    ``norm`` and ``bias`` (and the embedding, by choice of the trainer)."""
    return {name: param_group(name, p).value for name, p in model.named_parameters()}


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, *, width_scale: float = 1.0) -> None:
    """Initialises ``model`` in place (see the module docstring for the per-group std).

    Args:
        model: a LongcatFlashForCausalLM (or any module named like it).
        cfg: supplies ``initializer_range``.
        width_scale: width factor s > 0 of §3.1.1 (1.0 = no transfer).

    Raises:
        ValueError: if width_scale <= 0.
    """
    if not width_scale > 0:
        raise ValueError(f"width_scale={width_scale} must be > 0 (hidden_target / hidden_proxy)")
    base_std = cfg.initializer_range
    std = {
        ParamGroup.EMBEDDING: base_std,
        ParamGroup.HIDDEN: base_std / math.sqrt(width_scale),
        ParamGroup.UNEMBEDDING: base_std / math.sqrt(width_scale),
        ParamGroup.ROUTER: base_std,
    }
    for name, param in model.named_parameters():
        group = param_group(name, param)
        if group == ParamGroup.NORM:
            param.fill_(1.0)
        elif group == ParamGroup.BIAS:
            param.zero_()
        else:
            param.normal_(mean=0.0, std=std[group])
    for name, buf in model.named_buffers():
        if name.split(".")[-1] == "e_score_correction_bias":
            buf.zero_()
