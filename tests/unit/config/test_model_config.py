"""ModelConfig.validate: wrong values are ValueErrors naming the field and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from longcat.config.schema import ModelConfig
from longcat.model.hf_mapping import hf_config_dict, model_config_from_hf


@pytest.mark.parametrize("field,value", [("q_lora_rank", None), ("kv_lora_rank", None), ("hidden_size", 0),
                                         ("moe_topk", 2.5), ("n_routed_experts", True)])
def test_non_positive_or_non_integer_dimension_is_named(field, value):
    cfg = dataclasses.replace(ModelConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"model.{field}={value!r} must be a positive integer"):
        cfg.validate()


def test_zero_expert_num_none_is_named():
    with pytest.raises(ValueError, match=r"model.zero_expert_num=None must be an integer >= 0"):
        dataclasses.replace(ModelConfig(), zero_expert_num=None).validate()


def test_hf_config_with_null_q_lora_rank_is_a_clear_error():
    """DeepSeek-style config.json files write q_lora_rank: null (no query compression)."""
    hf = dict(hf_config_dict(ModelConfig()), model_type="longcat_flash", q_lora_rank=None)
    with pytest.raises(ValueError, match=r"model.q_lora_rank=None must be a positive integer \(LongCat-Flash"):
        model_config_from_hf(hf)
