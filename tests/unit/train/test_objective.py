"""TrainingObjective: the normalisation of each term, the LB group default, the alpha read at every
call, and the pipeline stage's view (head_loss / aux_terms) agreeing with the plain step's."""

from __future__ import annotations

import pytest
import torch

from longcat.config.schema import LossConfig, ModelConfig, MoEConfig
from longcat.model.moe import MoEStats
from longcat.train import losses
from longcat.train.objective import TrainingObjective

N, Z, K, K_E = 4, 2, 2, 1.5
MODEL = ModelConfig(vocab_size=16, hidden_size=8, num_layers=2, num_attention_heads=2, ffn_hidden_size=16,
                    q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2,
                    n_routed_experts=N, zero_expert_num=Z, moe_topk=K, expert_ffn_hidden_size=4)
LOSS = LossConfig(mtp_weight=0.3, z_loss_coef=1e-3)
COUNTS = losses.GlobalTokenCounts(num_labels=10.0, num_mtp_labels=8.0, num_real=12.0)


def _objective(alpha=lambda: 0.1, *, lb_num_groups=0, ep_size=2) -> TrainingObjective:
    moe = MoEConfig(expected_ffn_experts=K_E, lb_loss_coef=0.1, lb_num_groups=lb_num_groups)
    return TrainingObjective(loss_cfg=LOSS, moe_cfg=moe, model_cfg=MODEL, num_microbatches=2, dp_size=3,
                             ep_size=ep_size, lb_coef=alpha)


def _stats(seed: int) -> MoEStats:
    gen = torch.Generator().manual_seed(seed)
    probs_TE = torch.rand(6, N + Z, generator=gen).softmax(-1).requires_grad_()
    ids_TK = probs_TE.topk(K, dim=-1).indices
    counts_E = torch.bincount(ids_TK.flatten(), minlength=N + Z).float()
    return MoEStats(expert_counts_E=counts_E, prob_sum_E=probs_TE.sum(0), num_tokens=torch.tensor(6.0),
                    ffn_per_token_T=(ids_TK < N).sum(-1).float())


def _batch():
    gen = torch.Generator().manual_seed(0)
    labels_BS = torch.randint(0, 16, (2, 5), generator=gen)
    labels_BS[0, -1] = losses.IGNORE_INDEX
    return dict(logits_BSV=torch.randn(2, 5, 16, generator=gen), mtp_logits_BSV=torch.randn(2, 5, 16, generator=gen),
                last_hidden_BSD=torch.randn(2, 5, 8, generator=gen), labels_BS=labels_BS,
                token_mask_BS=torch.ones(2, 5, dtype=torch.bool))


def test_lm_terms_are_normalised_by_the_global_counts():
    b = _batch()
    lm = _objective().lm_terms(**b, counts=COUNTS, vocab_parallel=False)
    ce = losses.cross_entropy_sum(b["logits_BSV"], b["labels_BS"]) / 10.0
    mtp = 0.3 * losses.cross_entropy_sum(b["mtp_logits_BSV"], losses.mtp_labels(b["labels_BS"])) / 8.0
    z = 1e-3 * losses.hidden_z_loss_sum(b["last_hidden_BSD"], b["token_mask_BS"]) / 12.0
    assert torch.equal(lm.ce, ce) and torch.equal(lm.mtp, mtp) and torch.equal(lm.z, z)
    assert torch.equal(lm.total, ce + mtp + z)


def test_load_balance_groups_default_to_ep_and_alpha_is_read_at_every_call():
    stats = [_stats(1), _stats(2)]
    alpha = [0.1]
    objective = _objective(lambda: alpha[0], ep_size=2)
    assert objective.lb_num_groups == 2 and _objective(lb_num_groups=1).lb_num_groups == 1
    raw = [losses.load_balance_loss(s.expert_counts_E, s.prob_sum_E, s.num_tokens, n_routed_experts=N, moe_topk=K,
                                    expected_ffn_experts=K_E, num_groups=2) for s in stats]
    for value in (0.1, 0.04):
        alpha[0] = value
        lb = objective.load_balance(stats)
        assert lb.scale == value / (2 * 3)  # averaged over the global batch's micro-batches (A=2, dp=3)
        assert torch.equal(lb.total(), sum(raw) * lb.scale)
        assert all(torch.equal(t, r * lb.scale) for t, r in zip(lb.per_layer(), raw))
    alpha[0] = 0.0
    assert objective.load_balance(stats) is None and objective.load_balance_loss(stats) is None


def test_stage_view_matches_the_plain_step():
    b, stats = _batch(), [_stats(3)]
    objective = _objective()
    lb = objective.load_balance_loss(stats)
    total, terms = objective.head_loss(**b, counts=COUNTS, vocab_parallel=False, lb=lb)
    lm = objective.lm_terms(**b, counts=COUNTS, vocab_parallel=False)
    assert torch.equal(total, lm.total + lb)
    want = torch.stack([lm.ce, lm.mtp, lm.z, lb]).double()
    assert terms.dtype == torch.float64 and torch.equal(terms, want) and not terms.requires_grad
    assert dict(zip(TrainingObjective.TERM_NAMES, terms.tolist()))["lb"] == pytest.approx(lb.item())
    aux = objective.aux_terms(lb, like=b["last_hidden_BSD"])
    assert torch.equal(aux, torch.tensor([0.0, 0.0, 0.0, lb.item()], dtype=torch.float64))
    sums = objective.eval_sums(b["logits_BSV"], b["labels_BS"], vocab_parallel=False)
    assert sums.tolist() == [losses.cross_entropy_sum(b["logits_BSV"], b["labels_BS"]).double().item(), 9.0]
