"""Hyperparameter transfer (arXiv 2509.01322 §3.1.1, Table 1): every parameter group gets the rule's values."""

import math

import pytest
import torch

from longcat.config.schema import ModelConfig, OptimConfig
from longcat.model import LongcatFlashForCausalLM, init_weights
from longcat.model.init import param_group
from longcat.train.optim import build_optimizer, width_scale


def _model(hidden):
    cfg = ModelConfig(vocab_size=512, hidden_size=hidden, ffn_hidden_size=4 * hidden, expert_ffn_hidden_size=hidden,
                      q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4)
    return cfg, LongcatFlashForCausalLM(cfg)


def test_every_group_gets_the_transferred_lr_and_decay():
    cfg, model = _model(256)
    optim_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, proxy_hidden_size=64)
    s = width_scale(cfg, optim_cfg)
    assert s == 4
    opt = build_optimizer(model, optim_cfg=optim_cfg, model_cfg=cfg)
    expected_lr = {"embedding": 1e-2, "hidden": 1e-2 / s, "unembedding": 1e-2 / s, "router": 1e-2 / s,
                   "norm": 1e-2 / s, "bias": 1e-2 / s}
    expected_wd = {"embedding": 0.0, "hidden": 0.1, "unembedding": 0.1, "router": 0.1, "norm": 0.0, "bias": 0.0}
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    seen = set()
    for name, p in model.named_parameters():
        group = by_param[id(p)]
        kind = param_group(name, p).value
        assert group["kind"] == kind
        assert group["lr"] == pytest.approx(expected_lr[kind]), name
        assert group["weight_decay"] == expected_wd[kind], name
        seen.add(kind)
    assert {"embedding", "hidden", "unembedding", "router", "norm"} <= seen


def test_init_variance_divided_by_width_factor():
    cfg, model = _model(256)
    torch.manual_seed(0)
    init_weights(model, cfg, width_scale=4.0)
    sd = dict(model.named_parameters())
    r = cfg.initializer_range
    assert sd["model.embed_tokens.weight"].std().item() == pytest.approx(r, rel=0.05)
    assert sd["lm_head.weight"].std().item() == pytest.approx(r / math.sqrt(4.0), rel=0.05)
    assert sd["model.layers.0.mlps.0.up_proj.weight"].std().item() == pytest.approx(r / 2, rel=0.05)
