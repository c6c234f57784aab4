"""A golden CPU trace: refactors that must not change the math are caught bit for bit.

A fixed tiny run (the test config, 4 steps of fixed random global batches, fp32, one thread) in one
process and under ep=2 (2 gloo processes, experts split, dp=2): each step's loss and grad norm must
equal, bitwise, the values committed in ``tests/golden/tiny_trace.json``. A change that alters the
math (an operation order, a reduction, an init) fails here even when every tolerance test passes.

When a change is *meant* to alter the numbers, rewrite the file and say why in the commit:

    LONGCAT_WRITE_GOLDEN=1 .venv/bin/pytest tests/integration/test_golden_trace.py

The values depend on the torch build (pinned by requirements.lock) and on the CPU: torch's kernels
take other code paths (and round differently) by vendor and vector ISA. The file therefore holds one
trace per CPU it was recorded on (``cpu``: vendor and ``torch.backends.cpu.get_cpu_capability()``,
or the vendor alone where the capability was not recorded). On a CPU with a trace the check is
bitwise; on another, each step must equal every recorded trace to 1e-6 (loss) / 1e-5 (grad norm)
relative (the CPUs seen differ by ~1e-8), and ``LONGCAT_WRITE_GOLDEN=1`` adds that CPU's trace. They
do not depend on the corpus: the batches are generated here, and the model's init depends only on the seed.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.distributed import linear_cross_entropy
from longcat.distributed.linear_cross_entropy import lm_head_cross_entropy_sum
from longcat.model import model as model_module
from longcat.testing.equivalence import Layout, run_layouts, run_single

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_trace.json"
NUM_STEPS = 4
IGNORE_INDEX = -100


def _batches(*, vocab: int, rows: int = 4, seq: int = 16) -> list[list[dict]]:
    gen = torch.Generator().manual_seed(2509)  # arXiv 2509.01322
    steps = []
    for _ in range(NUM_STEPS):
        batch = []
        for _ in range(rows):
            ids = torch.randint(0, vocab, (1, seq), generator=gen)
            labels = torch.roll(ids, -1, dims=1)
            labels[:, -1] = IGNORE_INDEX
            batch.append({"input_ids": ids, "labels": labels, "token_mask": torch.ones_like(ids, dtype=torch.bool)})
        steps.append(batch)
    return steps


def _trace(losses: list[float], grad_norms: list[float]) -> dict[str, list[str]]:
    return {"loss": [float(x).hex() for x in losses], "grad_norm": [float(x).hex() for x in grad_norms]}


def cpu_signature() -> dict[str, str]:
    """The CPU's vendor (``/proc/cpuinfo`` ``vendor_id``, else ``platform.processor()``) and torch's
    vector capability (``AVX2``, ``AVX512``, ...)."""
    vendor = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"vendor": vendor, "capability": torch.backends.cpu.get_cpu_capability()}


def _matches(recorded: dict[str, str], cpu: dict[str, str]) -> bool:
    return recorded["vendor"] == cpu["vendor"] and recorded.get("capability", cpu["capability"]) == cpu["capability"]


def test_loss_and_grad_norm_trace_is_bitwise_golden(corpus_cache, tmp_path):
    overrides = {"data.seq_length": 16, "data.micro_batch_size": 1, "data.global_batch_size": 4,
                 "train.eval_interval": 0, "train.checkpoint_interval": 0, "moe.bias_update_rate": 0.2}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path), **overrides))
    batches = _batches(vocab=cfg.model.vocab_size)
    single = run_single(cfg, num_steps=NUM_STEPS, batches=batches)
    ep2 = run_layouts(cfg, [Layout("ep2", dp=2, ep=2)], num_steps=NUM_STEPS, batches=batches)["ep2"]
    got = {"single": _trace(single.losses, single.grad_norms),
           "ep2": _trace(ep2[0].losses, ep2[0].grad_norms)}
    assert ep2[1].losses == ep2[0].losses and ep2[1].grad_norms == ep2[0].grad_norms
    cpu = cpu_signature()
    golden = json.loads(GOLDEN.read_text())
    if os.environ.get("LONGCAT_WRITE_GOLDEN") == "1":
        kept = [t for t in golden["traces"] if not _matches(t["cpu"], cpu)] \
            if golden["torch"] == torch.__version__.split("+")[0] else []
        golden = {"torch": torch.__version__.split("+")[0], "traces": kept + [{"cpu": cpu, **got}]}
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    assert golden["torch"] == torch.__version__.split("+")[0], "the golden trace was written with another torch"
    same_cpu = [t for t in golden["traces"] if _matches(t["cpu"], cpu)]
    for trace in same_cpu or golden["traces"]:
        for run in ("single", "ep2"):
            for key, rtol in (("loss", 1e-6), ("grad_norm", 1e-5)):
                want = [float.fromhex(x) for x in trace[run][key]]
                have = [float.fromhex(x) for x in got[run][key]]
                if same_cpu:
                    assert have == want, f"{run} {key} on {cpu}: {have} != golden {want}"
                else:  # no trace of this CPU: near every recorded one
                    torch.testing.assert_close(have, want, rtol=rtol, atol=0,
                                               msg=f"{run} {key} on {cpu} (no trace of this CPU) vs {trace['cpu']}")
    assert golden["traces"], "no golden trace recorded"


@pytest.mark.parametrize("in_forward", [False, True], ids=["recompute", "grads-in-forward"])
def test_fused_head_trace_matches_the_logits_path(corpus_cache, tmp_path, monkeypatch, in_forward):
    """The golden run (fused LM head + CE, the default) and the same run through the head's logits
    (``loss.lm_head_ce=logits``) agree to fp32 rounding, step by step, whichever way the fused head
    forms its gradients (here 16 tokens per micro-batch < D: recompute, unless forced into the forward)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return lm_head_cross_entropy_sum(*args, **kwargs)

    monkeypatch.setattr(model_module, "lm_head_cross_entropy_sum", counted)
    monkeypatch.setattr(linear_cross_entropy, "grads_in_forward", lambda num_tokens, hidden_size: in_forward)
    overrides = {"data.seq_length": 16, "data.micro_batch_size": 1, "data.global_batch_size": 4,
                 "train.eval_interval": 0, "train.checkpoint_interval": 0, "moe.bias_update_rate": 0.2}
    runs, fused_calls = {}, {}
    for mode in ("fused", "logits"):
        cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path / mode),
                                                               **overrides, **{"loss.lm_head_ce": mode}))
        calls.clear()
        runs[mode] = run_single(cfg, num_steps=NUM_STEPS, batches=_batches(vocab=cfg.model.vocab_size))
        fused_calls[mode] = len(calls)
    assert fused_calls == {"fused": NUM_STEPS * 4, "logits": 0}  # one per micro-batch, only when fused
    torch.testing.assert_close(runs["fused"].losses, runs["logits"].losses, rtol=1e-6, atol=0)
    torch.testing.assert_close(runs["fused"].grad_norms, runs["logits"].grad_norms, rtol=1e-5, atol=0)
