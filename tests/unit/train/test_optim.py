import copy

import torch

from longcat.config.schema import ModelConfig, OptimConfig
from longcat.model import LongcatFlashForCausalLM
from longcat.train.optim import build_optimizer


def test_build_optimizer_uses_the_fused_adamw_kernel_with_the_same_math():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=64, expert_ffn_hidden_size=16, q_lora_rank=16,
                      kv_lora_rank=8)
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg)
    optim_cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = build_optimizer(model, optim_cfg=optim_cfg, model_cfg=cfg)
    assert opt.defaults["fused"] is True
    # the same update as torch's per-parameter AdamW with the same groups, to rounding
    ref_model = copy.deepcopy(model)
    ref_params = dict(ref_model.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    ref = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"},
                              "params": [ref_params[names[id(p)]] for p in g["params"]]} for g in opt.param_groups],
                            foreach=False, fused=False)
    for _ in range(3):
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
