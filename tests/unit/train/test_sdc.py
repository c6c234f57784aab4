import random

import pytest
import torch

from longcat.config.schema import FaultInjection
from longcat.train import determinism, sdc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_checksum_changes_for_every_single_bit_flip(dtype):
    torch.manual_seed(0)
    t = (torch.randn(37, 5) * 100).to(dtype)
    base = sdc.tensor_checksum(t)
    assert sdc.tensor_checksum(t.clone()) == base
    rng = random.Random(1)
    bits = {torch.float32: 32, torch.bfloat16: 16, torch.int64: 63}[dtype]
    for _ in range(200):
        flipped = t.clone()
        sdc.flip_bit_(flipped, index=rng.randrange(t.numel()), bit=rng.randrange(bits))
        assert sdc.tensor_checksum(flipped) != base


def test_checksum_detects_swapped_elements():
    t = torch.arange(10, dtype=torch.float32)
    swapped = t.clone()
    swapped[[2, 7]] = swapped[[7, 2]]
    assert sdc.tensor_checksum(t) != sdc.tensor_checksum(swapped)


def test_compare_names_the_tensor():
    a = {"w": 1, "b": 2}
    found = sdc.compare_checksums(a, {"w": 1, "b": 3}, step=4, rank=1)
    assert [m.tensor for m in found] == ["b"]
    assert "step 4" in str(found[0]) and "rank 1" in str(found[0]) and "'b'" in str(found[0])


def test_fault_injector_flips_once_on_the_chosen_rank_and_step():
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    cfg = FaultInjection(step=3, rank=1, target="parameter", tensor="weight", index=5, bit=30)
    sdc.FaultInjector(cfg, rank=0).after_optimizer(model, step=3)
    assert torch.equal(model.weight, before)
    inj = sdc.FaultInjector(cfg, rank=1)
    inj.after_optimizer(model, step=2)
    assert torch.equal(model.weight, before)
    inj.after_optimizer(model, step=3)
    inj.after_optimizer(model, step=3)
    assert (model.weight != before).sum() == 1


def test_fault_injector_unknown_tensor_is_a_clear_error():
    inj = sdc.FaultInjector(FaultInjection(step=0, rank=0, target="gradient", tensor="nope"), rank=0)
    with pytest.raises(ValueError, match="nope"):
        inj.after_backward(torch.nn.Linear(2, 2), step=0)


def test_derived_seeds_differ_by_rank_and_purpose():
    seeds = {determinism.derive_seed(1, rank=r, purpose=p) for r in range(4) for p in ("data", "dropout")}
    assert len(seeds) == 8
    assert determinism.derive_seed(1, rank=0, purpose="data") == determinism.derive_seed(1, rank=0, purpose="data")


def test_batched_checksums_equal_single_ones():
    torch.manual_seed(0)
    named = [("w", torch.randn(37, 5)), ("odd_bf16", torch.randn(7).bfloat16()), ("ids", torch.arange(9)),
             ("empty", torch.zeros(0)), ("strided", torch.randn(6, 4).t()), ("none", None)]
    sums = sdc.checksums(named)
    assert sums == {name: sdc.tensor_checksum(t) for name, t in named if t is not None}
    assert all(-2**63 <= v < 2**63 for v in sums.values())


def test_checksum_is_independent_of_layout_but_not_of_values():
    t = torch.randn(8, 16)
    assert sdc.tensor_checksum(t.t().contiguous().t()) == sdc.tensor_checksum(t)
    assert sdc.tensor_checksum(t.reshape(16, 8)) == sdc.tensor_checksum(t)  # the bits, not the shape
    assert sdc.tensor_checksum(-t) != sdc.tensor_checksum(t)


def test_activation_fault_replaces_a_view_output_without_touching_it():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inj = sdc.FaultInjector(FaultInjection(step=1, rank=0, target="activation", tensor="0", index=2, bit=30), rank=0)
    x = torch.randn(3, 4)
    clean = model(x)
    handle = inj.activation_hook(model, step=1)
    faulty = model(x)
    handle.remove()
    assert (faulty != clean).sum() == 1 and inj.injected_at == 1
    assert torch.equal(model(x), clean)
