"""Model structure: parameter counts (tiny and the real 560B on meta), names, init, MTP, configs."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import pytest
import torch

from longcat.config.schema import ModelConfig
from longcat.model import (
    LongcatFlashForCausalLM,
    count_parameters,
    init_weights,
    param_groups_names,
)

CONF_DIR = pathlib.Path(__file__).resolve().parents[3] / "conf" / "model"
TINY = ModelConfig(
    vocab_size=256, hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=64, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=6,
    zero_expert_num=3, moe_topk=3, expert_ffn_hidden_size=16,
)


def _load_yaml(name: str) -> ModelConfig:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = ModelConfig(**omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    cfg.validate()
    return cfg


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mtp_num_layers": 1}, {"tie_word_embeddings": True}, {"attention_bias": True, "zero_expert_num": 0}],
)
def test_count_parameters_matches_module(overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    model = LongcatFlashForCausalLM(cfg)
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    assert counts.active_min == counts.total - expert_params - embedding - counts.mtp
    assert counts.active_max - counts.active_min == cfg.num_layers * cfg.moe_topk * counts.per_expert
    assert counts.active_at(cfg.moe_topk) == counts.active_max


def test_real_560b_builds_on_meta_quickly():
    cfg = _load_yaml("longcat_flash")
    start = time.perf_counter()
    with torch.device("meta"):
        model = LongcatFlashForCausalLM(cfg)
    assert time.perf_counter() - start < 30
    total = sum(p.numel() for p in model.parameters())
    counts = count_parameters(cfg)
    assert total == counts.total
    assert 555e9 < total < 565e9  # paper: 560B
    assert 18.0e9 < counts.active_min < 19.5e9  # paper: 18.6B
    assert 30.5e9 < counts.active_max < 32.0e9  # paper: 31.3B
    assert 26e9 < counts.active_at(8) < 28e9  # paper: ~27B on average
    layer = model.model.layers[0]
    assert layer.mlp.experts.gate_proj.shape == (512, 2048, 6144)
    assert layer.mlp.experts.down_proj.shape == (512, 6144, 2048)
    assert layer.mlp.router.classifier.weight.shape == (768, 6144)


def test_state_dict_names_follow_the_checkpoint():
    keys = set(LongcatFlashForCausalLM(dataclasses.replace(TINY, mtp_num_layers=1)).state_dict())
    for key in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.0.q_a_proj.weight",
        "model.layers.1.self_attn.1.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.1.kv_a_layernorm.weight",
        "model.layers.0.mlps.1.down_proj.weight",
        "model.layers.0.input_layernorm.0.weight",
        "model.layers.0.post_attention_layernorm.1.weight",
        "model.layers.0.mlp.router.classifier.weight",
        "model.layers.0.mlp.router.e_score_correction_bias",
        "model.layers.0.mlp.experts.gate_proj",
        "model.layers.0.mlp.experts.up_proj",
        "model.layers.0.mlp.experts.down_proj",
        "model.norm.weight",
        "model.mtp.eh_proj.weight",
        "model.mtp.enorm.weight",
        "model.mtp.hnorm.weight",
        "model.mtp.norm.weight",
        "lm_head.weight",
    ]:
        assert key in keys, key


def test_param_groups_and_init_std():
    cfg = dataclasses.replace(TINY, hidden_size=256, attention_bias=True, initializer_range=0.02)
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg)
    init_weights(model, cfg, width_scale=4.0)
    groups = param_groups_names(model)
    assert groups.keys() == dict(model.named_parameters()).keys()
    assert groups["model.embed_tokens.weight"] == "embedding"
    assert groups["lm_head.weight"] == "unembedding"
    assert groups["model.layers.0.mlp.router.classifier.weight"] == "router"
    assert groups["model.layers.0.self_attn.0.q_a_proj.bias"] == "bias"
    assert groups["model.layers.0.self_attn.0.q_a_layernorm.weight"] == "norm"
    assert groups["model.layers.1.mlp.experts.down_proj"] == "hidden"
    assert groups["model.layers.1.mlps.0.gate_proj.weight"] == "hidden"
    params = dict(model.named_parameters())

    def std(group):
        return torch.cat([params[n].flatten() for n, g in groups.items() if g == group]).std().item()

    assert std("embedding") == pytest.approx(0.02, rel=0.05)
    assert std("router") == pytest.approx(0.02, rel=0.1)
    assert std("hidden") == pytest.approx(0.02 / math.sqrt(4.0), rel=0.05)
    assert std("unembedding") == pytest.approx(0.02 / math.sqrt(4.0), rel=0.05)
    assert all(torch.all(params[n] == 1) for n, g in groups.items() if g == "norm")
    assert all(torch.all(params[n] == 0) for n, g in groups.items() if g == "bias")
    with pytest.raises(ValueError, match="width_scale"):
        init_weights(model, cfg, width_scale=0.0)


def test_mtp_logits_predict_two_ahead_causally():
    cfg = dataclasses.replace(TINY, mtp_num_layers=1, initializer_range=0.1)
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        base = model(ids)
        changed = ids.clone()
        changed[0, 6] = (changed[0, 6] + 1) % cfg.vocab_size
        out = model(changed)
    assert base.mtp_logits_BSV.shape == base.logits_BSV.shape == (1, 10, cfg.vocab_size)
    # mtp[t] reads h_t and tok_{t+1}: positions < 5 are unchanged, position 5 (tok_6 as input) changes.
    torch.testing.assert_close(out.mtp_logits_BSV[:, :5], base.mtp_logits_BSV[:, :5])
    assert not torch.allclose(out.mtp_logits_BSV[:, 5], base.mtp_logits_BSV[:, 5])
    torch.testing.assert_close(out.logits_BSV[:, :6], base.logits_BSV[:, :6])
    # last_hidden is before the final norm.
    torch.testing.assert_close(model.lm_head(model.model.norm(base.last_hidden_BSD)), base.logits_BSV)
    assert LongcatFlashForCausalLM(TINY)(ids).mtp_logits_BSV is None


def test_inference_mode_then_training():
    model = LongcatFlashForCausalLM(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 6))
    with torch.inference_mode():
        expected = model(ids).logits_BSV.clone()
    out = model(ids)  # the RoPE tables must not be cached inference tensors
    out.logits_BSV.sum().backward()
    torch.testing.assert_close(out.logits_BSV.detach(), expected)


def test_input_validation():
    model = LongcatFlashForCausalLM(TINY)
    ids = torch.randint(0, TINY.vocab_size, (2, 5))
    with pytest.raises(ValueError, match="token_mask_BS"):
        model(ids, token_mask_BS=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_ids_BS"):
        model(ids[0])
    with pytest.raises(ValueError, match="position_ids_BS"):
        model(ids, position_ids_BS=torch.arange(4)[None])
    with pytest.raises(ValueError, match="moe_topk"):
        LongcatFlashForCausalLM(dataclasses.replace(TINY, moe_topk=20))


@pytest.mark.parametrize("name", ["tiny", "small", "longcat_flash"])
def test_model_yaml_configs_load(name):
    cfg = _load_yaml(name)
    assert (CONF_DIR / f"{name}.yaml").read_text().splitlines()[0] == "# @package model"
    if name == "longcat_flash":
        assert count_parameters(cfg).total > 5e11
    else:
        model = LongcatFlashForCausalLM(cfg)
        out = model(torch.randint(0, cfg.vocab_size, (1, 8)))
        assert out.logits_BSV.shape == (1, 8, cfg.vocab_size)


def test_meta_build_then_init_keeps_tied_embeddings_tied():
    """Build on meta, materialise with to_empty, init: the LM head and the embedding stay one parameter."""
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LongcatFlashForCausalLM(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (model.lm_head.weight.untyped_storage().data_ptr()
            == model.model.embed_tokens.weight.untyped_storage().data_ptr())
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    assert model.lm_head.weight.std() > 0  # initialised, not left empty
    with torch.device("meta"):
        untied = LongcatFlashForCausalLM(dataclasses.replace(cfg, tie_word_embeddings=False))
    untied.to_empty(device="cpu")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
