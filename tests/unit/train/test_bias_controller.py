import torch

from longcat.config.schema import ModelConfig, MoEConfig
from longcat.train.bias_controller import ExpertBiasController


def _controller(**moe):
    model = ModelConfig(n_routed_experts=4, zero_expert_num=2, moe_topk=2)
    return ExpertBiasController(MoEConfig(expected_ffn_experts=1.0, bias_update_rate=0.1, **moe), model,
                                num_layers=1, total_steps=10)


def test_overloaded_expert_bias_goes_down_and_zero_experts_fixed():
    ctrl = _controller()
    bias = torch.zeros(6)
    # 10 tokens x K=2 = 20 assignments; expert 0 gets 12 (above its share), zero experts 2.
    counts = torch.tensor([12.0, 2.0, 2.0, 2.0, 1.0, 1.0])
    ctrl.accumulate([counts], [torch.tensor(10.0)])
    ctrl.step([bias], dp_group=None)
    # Eq. 2: b_i += mu * (K_e/(K N) - T_i/(K T_all))
    expected = 0.1 * (1.0 / (2 * 4) - counts[:4] / (2 * 10))
    assert torch.allclose(bias[:4], expected.float())
    assert bias[0] < 0 and bias[1] > 0
    assert bias[4:].eq(0).all()


def test_counts_summed_over_micro_batches_equal_one_batch():
    a, b = _controller(), _controller()
    bias_a, bias_b = torch.zeros(6), torch.zeros(6)
    c1, c2 = torch.tensor([3.0, 1, 0, 2, 1, 1]), torch.tensor([1.0, 4, 2, 0, 0, 1])
    a.accumulate([c1], [torch.tensor(4.0)])
    a.accumulate([c2], [torch.tensor(4.0)])
    b.accumulate([c1 + c2], [torch.tensor(8.0)])
    a.step([bias_a], dp_group=None)
    b.step([bias_b], dp_group=None)
    assert torch.equal(bias_a, bias_b)


def test_rate_schedules_decay():
    ctrl = _controller(bias_update_schedule="cosine", bias_update_rate_min_ratio=0.1)
    first = ctrl.rate()
    ctrl.num_updates = 10
    assert abs(first - 0.1) < 1e-12 and abs(ctrl.rate() - 0.01) < 1e-12
    ctrl2 = _controller()
    ctrl2.load_state_dict(ctrl.state_dict())
    assert ctrl2.num_updates == 10
