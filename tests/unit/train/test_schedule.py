import pytest

from longcat.config.schema import OptimConfig
from longcat.train.schedule import lr_multiplier


def test_warmup_cosine_shape():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="warmup_cosine")
    m = [lr_multiplier(s, cfg=cfg, total_steps=110) for s in range(110)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert m[10] == pytest.approx(1.0) and m[-1] > 0.1 and m[-1] < 0.11
    assert all(a >= b for a, b in zip(m[10:], m[11:]))


def test_wsd_holds_then_decays():
    cfg = OptimConfig(warmup_steps=0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    m = [lr_multiplier(s, cfg=cfg, total_steps=100) for s in range(101)]
    assert all(x == 1.0 for x in m[:80])
    assert m[90] == pytest.approx(0.5) and m[100] == pytest.approx(0.0)


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning(caplog):
    """The default warmup (20 steps) with train.steps=10: a tenth of the run, so the peak LR is reached."""
    import logging

    import torch

    from longcat.train.schedule import build_scheduler, effective_warmup_steps

    cfg = OptimConfig(warmup_steps=20, min_lr_ratio=0.1, schedule="warmup_cosine")
    assert effective_warmup_steps(cfg, total_steps=10) == 1
    assert effective_warmup_steps(cfg, total_steps=20) == 20  # fits: kept
    assert lr_multiplier(0, cfg=cfg, total_steps=10) == 1.0  # after 1 warmup step: the peak
    assert lr_multiplier(9, cfg=cfg, total_steps=10) < 1.0
    with caplog.at_level(logging.WARNING, logger="longcat.train.schedule"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg=cfg, total_steps=10)
    assert "optim.warmup_steps=20 exceeds train.steps=10: warming up over 1 steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longcat.train.schedule"):  # 5 steps: no warmup, said so
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg=cfg, total_steps=5)
    assert effective_warmup_steps(cfg, total_steps=5) == 0 and "warming up over 0 steps" not in caplog.text
    assert "optim.warmup_steps=20 exceeds train.steps=5: no warmup" in caplog.text
