"""``determinism.enabled``: PyTorch's deterministic mode really on, per-rank streams, bitwise reruns.

The multi-process layouts (ep2, tp2, pp2) are in tests/distributed/test_determinism_parallel.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.validate import validate as validate_run_config
from longcat.train import determinism
from longcat.train.trainer import Trainer

NUM_STEPS = 5


@pytest.fixture
def restore_determinism():
    """Deterministic mode is process-wide: put the flags and variables back for later tests."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    env = {k: os.environ.get(k) for k in determinism.DETERMINISTIC_ENV}
    from torch._inductor import config as inductor_config

    inductor_deterministic = inductor_config.deterministic
    yield
    inductor_config.deterministic = inductor_deterministic
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = flags[2:]
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _cfg(corpus_cache, out_dir, **extra):
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(out_dir), **extra))
    validate_run_config(cfg, world_size=1)
    return cfg


def test_flag_turns_on_deterministic_mode(corpus_cache, tmp_path, restore_determinism):
    torch.use_deterministic_algorithms(False)
    for key in determinism.DETERMINISTIC_ENV:
        os.environ.pop(key, None)
    from torch._inductor import config as inductor_config

    inductor_config.deterministic = False
    Trainer(_cfg(corpus_cache, tmp_path / "off"))
    assert not torch.are_deterministic_algorithms_enabled()

    Trainer(_cfg(corpus_cache, tmp_path / "on", **{"determinism.enabled": "true"}))
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == determinism.CUBLAS_WORKSPACE
    assert os.environ["NCCL_ALGO"] == "Ring"
    from torch._inductor import config as inductor_config

    assert os.environ["TORCHINDUCTOR_DETERMINISTIC"] == "1" and inductor_config.deterministic
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.ones(2), accumulate=False)  # no deterministic kernel
    assert torch.isnan(torch.empty(3)).all()  # uninitialised memory is filled, so it cannot leak into results


def test_launch_enables_determinism_before_distributed_init(monkeypatch, corpus_cache, tmp_path, restore_determinism):
    """run_training turns the mode on before any process group (and CUDA / NCCL) exists."""
    import longcat.launch as launch

    torch.use_deterministic_algorithms(False)
    seen = {}

    def fake_init(run_cfg, **_):
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("stop here")

    monkeypatch.setattr(launch, "_init_distributed", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        launch.run_training(_cfg(corpus_cache, tmp_path, **{"determinism.enabled": "true"}), {})
    assert seen == {"deterministic": True}


def test_rank_streams_are_distinct_and_reproducible():
    def draw(rank):
        determinism.seed_rank_streams(42, rank=rank)
        return torch.rand(4), np.random.rand(2), torch.randint(0, 2**31, (1,), generator=determinism.seeded_generator(
            42, rank=rank, purpose="dropout"))

    r0, r0_again, r1 = draw(0), draw(0), draw(1)
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(r0, r0_again))
    assert not any(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(r0, r1))


def test_data_ranks_never_share_a_sample(corpus_cache, tmp_path):
    """The data order needs no per-rank stream: dp ranks take disjoint slices of one seeded order."""
    from longcat.data import build_pretrain_data

    cfg = _cfg(corpus_cache, tmp_path)
    loaders = [build_pretrain_data(cfg.data, vocab_size=cfg.model.vocab_size, dp_rank=r, dp_size=2).train
               for r in range(2)]
    seen = [set(), set()]
    for _ in range(10):
        for r, loader in enumerate(loaders):
            seen[r].update(loader.micro_batch_indices().tolist())
            next(loader)
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 10 * cfg.data.micro_batch_size


def _run(cfg) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    trainer = Trainer(cfg)
    results = [trainer.train_step() for _ in range(NUM_STEPS)]
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return [r.loss.total for r in results], [r.grad_norm for r in results], params


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_two_runs_are_bitwise_identical(corpus_cache, tmp_path, restore_determinism, bf16):
    overrides = {"determinism.enabled": "true", "train.bf16": str(bf16).lower(), "model.mtp_num_layers": 1}
    losses_a, norms_a, params_a = _run(_cfg(corpus_cache, tmp_path / "a", **overrides))
    losses_b, norms_b, params_b = _run(_cfg(corpus_cache, tmp_path / "b", **overrides))
    assert losses_a == losses_b and norms_a == norms_b
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
