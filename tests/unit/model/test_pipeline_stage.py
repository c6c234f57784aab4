"""The pipeline stage module's choices that need no process group: whether the zero-bubble schedules may
split the last stage's backward (a tied MTP table, or the fused head + CE, forbid it)."""

import dataclasses
from types import SimpleNamespace

import pytest

from longcat.config.schema import ModelConfig
from longcat.model import LongcatFlashForCausalLM
from longcat.model.parallel.pipeline import PipelineStageModule

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=32, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
    zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=16, mtp_num_layers=1,
)


@pytest.mark.parametrize("tied, fused, splits", [
    (False, False, True),  # the logits path, untied: input and weight passes may split
    (False, True, False),  # the fused head + CE is one node for both gradients: it would run twice
    (True, False, False),  # the tied table also embeds the MTP input
])
def test_last_stage_splits_its_backward_only_without_a_shared_node(tied, fused, splits):
    model = LongcatFlashForCausalLM(dataclasses.replace(CFG, tie_word_embeddings=tied))
    objective = SimpleNamespace(fused_head=fused)
    last = PipelineStageModule(model, stage_index=1, num_stages=2, layer_ids=range(1, 2), objective=objective)
    first = PipelineStageModule(model, stage_index=0, num_stages=2, layer_ids=range(0, 1), objective=objective)
    assert last.split_backward is splits
    assert first.split_backward  # no head on the first stage
