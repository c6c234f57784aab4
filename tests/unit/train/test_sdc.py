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
