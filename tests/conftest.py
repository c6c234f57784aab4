"""Shared fixtures: a small cached stdlib corpus and a tiny run config for trainer-level tests."""

from __future__ import annotations

import os

import pytest
import torch

# Two shared cores: one intra-op thread per test process keeps the multi-process tests from
# oversubscribing the machine (3 tiny steps: 30 s with 2 threads under load, 0.3 s with 1).
torch.set_num_threads(1)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

TEST_VOCAB = 512
TEST_CORPUS_BYTES = 300_000


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A cache dir holding a 300 kB stdlib corpus with a 512-id BPE (built once per session)."""
    from longcat.config.schema import DataConfig
    from longcat.data import build_pretrain_data

    cache = tmp_path_factory.mktemp("corpus")
    cfg = DataConfig(cache_dir=str(cache), corpus_max_bytes=TEST_CORPUS_BYTES, seq_length=32,
                     micro_batch_size=2, global_batch_size=4)
    build_pretrain_data(cfg, vocab_size=TEST_VOCAB, dp_rank=0, dp_size=1, progress=False)
    return str(cache)


def tiny_overrides(cache_dir: str, out_dir: str, **extra) -> list[str]:
    """Hydra overrides for a seconds-long run on the test corpus."""
    base = {
        "model.vocab_size": TEST_VOCAB, "model.hidden_size": 32, "model.num_layers": 2,
        "model.num_attention_heads": 2, "model.ffn_hidden_size": 64, "model.q_lora_rank": 16,
        "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 8,
        "model.v_head_dim": 8, "model.n_routed_experts": 4, "model.zero_expert_num": 2, "model.moe_topk": 2,
        "model.expert_ffn_hidden_size": 16, "moe.expected_ffn_experts": 1.5,
        "data.cache_dir": cache_dir, "data.corpus_max_bytes": TEST_CORPUS_BYTES, "data.seq_length": 32,
        "data.micro_batch_size": 2, "data.global_batch_size": 4, "train.out_dir": out_dir,
        "train.steps": 6, "train.eval_interval": 3, "train.eval_batches": 2, "train.checkpoint_interval": 3,
        "optim.warmup_steps": 2, "logging.wandb.mode": "disabled", "logging.progress_bar": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
