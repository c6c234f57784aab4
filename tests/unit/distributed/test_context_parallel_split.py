"""The load-balanced context-parallel split, its positions and its inverse, with cp ranks simulated in
one process (no torch.distributed); and a size-1 cp group leaving MLA on the single-device path."""

import pytest
import torch

from longcat.config.schema import ModelConfig
from longcat.distributed.context_parallel import (
    check_cp_seq_len,
    cp_chunk_ids,
    cp_local_positions,
    cp_reassemble,
    cp_split,
    cp_split_batch,
)
from longcat.distributed.groups import ProcessGroups
from longcat.model import LongcatFlashForCausalLM
from longcat.model.attention import MultiHeadLatentAttention
from longcat.model.parallel.context_parallel import apply_context_parallel
from longcat.model.rope import RotaryEmbedding

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4, ffn_hidden_size=32, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
    zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=16, mtp_num_layers=1,
)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_holds_mirrored_chunks_and_reassembles(cp):
    B, S = 3, 8 * cp
    x_BSD = torch.arange(B * S * 2).view(B, S, 2)
    L = S // (2 * cp)
    parts = [cp_split(x_BSD, cp_rank=r, cp=cp) for r in range(cp)]
    for r, part in enumerate(parts):
        low, high = cp_chunk_ids(cp_rank=r, cp=cp)
        assert (low, high) == (r, 2 * cp - 1 - r)
        assert part.shape == (B, S // cp, 2)
        assert torch.equal(part, torch.cat([x_BSD[:, low * L:(low + 1) * L], x_BSD[:, high * L:(high + 1) * L]], 1))
        positions = cp_local_positions(S, cp_rank=r, cp=cp)
        assert positions.dtype == torch.int64 and torch.equal(part[..., 0], x_BSD[:, positions, 0])
        assert torch.all(positions[1:] > positions[:-1])  # causal order kept inside a rank
    # Every global position is held exactly once, and the gathered parts reassemble the sequence.
    held = torch.cat([cp_local_positions(S, cp_rank=r, cp=cp) for r in range(cp)])
    assert torch.equal(held.sort().values, torch.arange(S))
    assert torch.equal(cp_reassemble(torch.cat(parts, dim=1), cp=cp), x_BSD)


@pytest.mark.parametrize("cp", [2, 4])
def test_causal_work_is_balanced(cp):
    """Key-chunk blocks a rank's queries attend to: (r + 1) + (2cp - r) = 2cp + 1 on every rank."""
    work = [sum(c + 1 for c in cp_chunk_ids(cp_rank=r, cp=cp)) for r in range(cp)]
    assert work == [2 * cp + 1] * cp


def test_split_other_dims_dtypes_and_batches():
    cp, S = 4, 16
    mask_SB = torch.rand(S, 2) > 0.5  # sequence first
    parts = [cp_split(mask_SB, cp_rank=r, cp=cp, seq_dim=0) for r in range(cp)]
    assert parts[0].dtype == torch.bool and parts[0].shape == (4, 2)
    assert torch.equal(cp_reassemble(torch.cat(parts, dim=0), cp=cp, seq_dim=0), mask_SB)
    x_BSHD = torch.randn(2, S, 3, 5, requires_grad=True)
    parts = [cp_split(x_BSHD, cp_rank=r, cp=cp, seq_dim=-3) for r in range(cp)]
    back = cp_reassemble(torch.cat(parts, dim=1), cp=cp, seq_dim=1)
    assert torch.equal(back, x_BSHD)
    back.sum().backward()  # differentiable: every element's grad is 1 (a permutation)
    assert torch.equal(x_BSHD.grad, torch.ones_like(x_BSHD))
    batch = {"input_ids": torch.arange(2 * S).view(2, S), "labels": torch.arange(2 * S).view(2, S) + 100,
             "num_docs": 3, "doc_lengths_B": torch.tensor([S, S])}
    local = cp_split_batch(batch, cp_rank=1, cp=cp)
    assert torch.equal(local["input_ids"][0], torch.tensor([2, 3, 12, 13]))
    assert torch.equal(local["labels"], local["input_ids"] + 100)
    assert local["num_docs"] == 3 and local["doc_lengths_B"] is batch["doc_lengths_B"]


@pytest.mark.parametrize("seq_len, cp", [(10, 4), (6, 2), (4, 4), (0, 1), (7, 1)])
def test_seq_len_not_divisible_raises(seq_len, cp):
    with pytest.raises(ValueError, match=rf"S={seq_len} is not divisible by 2\*cp={2 * cp} \(cp={cp}\).*use S="):
        check_cp_seq_len(seq_len, cp)
    with pytest.raises(ValueError, match=rf"S={seq_len} is not divisible"):
        cp_split(torch.zeros(1, seq_len), cp_rank=0, cp=cp)
    with pytest.raises(ValueError, match=rf"S={seq_len} is not divisible"):
        cp_local_positions(seq_len, cp_rank=0, cp=cp)


def test_error_suggests_neighbouring_lengths_and_checks_rank():
    with pytest.raises(ValueError, match=r"use S=8 or 16"):
        check_cp_seq_len(10, 4)
    with pytest.raises(ValueError, match=r"cp_rank=4 is outside \[0, cp=4\)"):
        cp_split(torch.zeros(1, 16), cp_rank=4, cp=4)
    with pytest.raises(ValueError, match=r"cp=0 must be >= 1"):
        check_cp_seq_len(16, 0)


def test_size_one_cp_group_is_the_single_device_path():
    """cp = 1: attention and model outputs and grads bit-identical to a model without the plan."""
    group = ProcessGroups.single().world_group
    torch.manual_seed(0)
    ref = LongcatFlashForCausalLM(CFG)
    torch.manual_seed(0)
    model = apply_context_parallel(LongcatFlashForCausalLM(CFG), cp_group=group)
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    assert len(attentions) == 3 and all(a.cp_group is group for a in attentions)  # 2 blocks + MTP
    ids_BS = torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    ref_out, out = ref(ids_BS), model(ids_BS)
    assert torch.equal(out.logits_BSV, ref_out.logits_BSV) and torch.equal(out.mtp_logits_BSV, ref_out.mtp_logits_BSV)
    (ref_out.logits_BSV.square().sum() + ref_out.mtp_logits_BSV.sum()).backward()
    (out.logits_BSV.square().sum() + out.mtp_logits_BSV.sum()).backward()
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, ref.get_parameter(name).grad), name
    with pytest.raises(ValueError, match="already applied"):
        apply_context_parallel(model, cp_group=group)


def test_refused_after_sequence_parallelism():
    """TP with sequence parallelism gathers the sequence in each MLA block's rope-key region; CP, which
    already splits the sequence, refuses such a model (TP without SP is accepted: cp x tp)."""
    from longcat.distributed.tensor_parallel import EnterParallelRegion

    groups = ProcessGroups.single()
    for sequence_parallel, refused in ((True, True), (False, False)):
        model = LongcatFlashForCausalLM(CFG)
        for module in model.modules():
            if isinstance(module, MultiHeadLatentAttention):
                module.k_rope_region = EnterParallelRegion(tp_group=groups.tp_group,
                                                           sequence_parallel=sequence_parallel)
        if refused:
            with pytest.raises(ValueError, match="sequence_parallel=false with cp"):
                apply_context_parallel(model, cp_group=groups.world_group)
        else:
            apply_context_parallel(model, cp_group=groups.world_group)


def test_rope_tables_at_global_positions():
    """cos/sin for the local tokens = the rows of the global table at their global positions."""
    rope = RotaryEmbedding(4, theta=1e4)
    S, cp = 16, 2
    cos_1SP, sin_1SP = rope(None, seq_len=S, device=torch.device("cpu"), dtype=torch.float32)
    for r in range(cp):
        positions_1N = cp_local_positions(S, cp_rank=r, cp=cp)[None]
        cos_1NP, sin_1NP = rope(positions_1N, seq_len=S // cp, device=torch.device("cpu"), dtype=torch.float32)
        assert torch.equal(cos_1NP, cp_split(cos_1SP, cp_rank=r, cp=cp))
        assert torch.equal(sin_1NP, cp_split(sin_1SP, cp_rank=r, cp=cp))
