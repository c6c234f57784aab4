"""The dry run's report, its errors, the device presets, the sweep and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longcat.bench import step_flops as bench_step_flops
from longcat.config.compose import compose_run_config
from longcat.model.flops import step_flops
from longcat.planning import LayoutError, dry_run, load_device, sweep
from longcat.planning.report import format_report, format_sweep

ROOT = Path(__file__).resolve().parents[3]
PAPER_LAYOUT = ["model=longcat_flash", "moe.expected_ffn_experts=8", "parallel.ep=32", "parallel.pp=14",
                "parallel.pp_schedule=zbv", "data.seq_length=8192", "data.micro_batch_size=1",
                "data.global_batch_size=3584", "train.bf16=true", "train.activation_checkpointing=true"]


def _cfg(*overrides: str):
    cfg, _ = compose_run_config("pretrain", list(overrides))
    return cfg


def test_flops_are_the_model_flops_formula():
    cfg = _cfg("model=tiny", "parallel.ep=2")
    report = dry_run(cfg, world_size=2, rank=1)
    expected = step_flops(cfg.model, batch_size=cfg.data.global_batch_size, seq_len=cfg.data.seq_length,
                          ffn_experts_per_token=cfg.moe.expected_ffn_experts)
    assert report.step_model_flops == expected.total_flops
    assert bench_step_flops is step_flops


def test_invalid_layout_names_the_numbers():
    with pytest.raises(LayoutError, match="parallel.ep=3"):
        dry_run(_cfg("model=tiny", "parallel.ep=3"), world_size=6, rank=0)
    with pytest.raises(LayoutError, match="num_layers"):  # a stage without layers
        dry_run(_cfg("model=tiny", "parallel.pp=4", "data.global_batch_size=64"), world_size=4, rank=0)


def test_memory_above_hbm_is_a_problem_with_the_numbers():
    device = load_device("H800", hbm_gib=0.001)
    report = dry_run(_cfg("model=tiny"), world_size=1, rank=0, device=device)
    assert not report.fits
    assert "exceeds H800 HBM 0.0 GiB" in report.problems[0] and "weights" in report.problems[0]
    table = format_report(report)
    assert any(line.startswith("fits") and line.endswith("NO") for line in table.splitlines())
    assert "problem: peak memory" in table


def test_timing_is_consistent():
    device = load_device("H200")
    report = dry_run(_cfg("model=tiny", "parallel.ep=2"), world_size=2, rank=0, device=device)
    t = report.time
    assert t is not None and report.fits
    assert t.step_s == pytest.approx(t.compute_s + t.bubble_s + t.exposed_comm_s)
    tokens = report.layout["global_batch_size"] * report.layout["seq_length"]
    assert t.tokens_per_s_per_device == pytest.approx(tokens / t.step_s / 2)
    assert t.mfu == pytest.approx(report.step_model_flops / (t.step_s * 2 * device.peak_tflops * 1e12))
    assert json.loads(json.dumps(report.to_dict()))["params"]["total"] == report.shard.params.total


def test_unknown_device_lists_the_presets():
    with pytest.raises(ValueError, match="H800"):
        load_device("B300x")


def test_paper_layout_reports_by_how_much_it_misses_60_gib():
    """§5.3's layout as the code can express it (no CP yet; replicate DP under PP): the report says it
    exceeds 60 GiB and names the parts."""
    report = dry_run(_cfg(*PAPER_LAYOUT), world_size=1792, rank=0, device=load_device("H800"), memory_limit_gib=60)
    assert report.model.total == pytest.approx(560e9, rel=0.01)
    assert not report.fits
    assert any("--memory-limit-gib 60.0 GiB by" in p for p in report.problems)
    assert report.traffic.by_group()["ep"].bytes > 0 and report.time is not None


def test_sweep_ranks_fitting_layouts_by_step_time():
    rows = sweep(_cfg("model=tiny", "data.global_batch_size=64"), world_size=4, device=load_device("H800"))
    fitting = [r for r in rows if r.report is not None and r.report.fits]
    assert len(fitting) >= 2
    times = [r.report.time.step_s for r in fitting if r.report.time]
    assert times == sorted(times)
    assert "tok/s/dev" in format_sweep(rows)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "dry_run.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_cli_full_model_json_and_exit_codes(tmp_path):
    out = tmp_path / "report.json"
    proc = _cli(*PAPER_LAYOUT, "--world-size", "1792", "--rank", "0", "--device", "H800",
                "--memory-limit-gib", "60", "--json", str(out))
    assert proc.returncode == 3, proc.stderr
    assert "model: total params        561.06 B" in proc.stdout
    data = json.loads(out.read_text())
    assert data["fits"] is False and data["layout"]["ep"] == 32
    bad = _cli("model=tiny", "parallel.ep=3", "--world-size", "6")
    assert bad.returncode == 2 and "error:" in bad.stderr
    assert _cli("--help").returncode == 0


def test_assumed_cp_splits_the_activations_and_adds_the_latent_exchange():
    base = ["model=tiny", "data.seq_length=64", "data.global_batch_size=16", "data.micro_batch_size=2"]
    plain = dry_run(_cfg(*base), world_size=8, rank=0)
    with_cp = dry_run(_cfg(*base), world_size=8, rank=0, assume_cp=4)
    assert with_cp.cp_assumed and with_cp.view.cp == 4 and with_cp.layout["dp"] == 2
    assert with_cp.view.num_microbatches == 16 // (2 * 2)
    assert with_cp.state == plain.state  # parameters are replicated over cp
    assert with_cp.activations.tokens_per_microbatch == plain.activations.tokens_per_microbatch / 4
    assert with_cp.traffic.by_group()["cp"].bytes > 0 == plain.traffic.by_group()["cp"].bytes
    with pytest.raises(LayoutError, match="must divide dp=8"):
        dry_run(_cfg(*base), world_size=8, rank=0, assume_cp=3)
    with pytest.raises(LayoutError, match="seq_length=40 must divide by 2 x cp = 16"):
        dry_run(_cfg(*base, "data.seq_length=40"), world_size=8, rank=0, assume_cp=8)


def test_configured_cp_is_planned_as_the_run_applies_it():
    """``parallel.cp`` builds the real cp groups (the plan applies CP to the meta model) and gives the
    figures ``--assume-cp`` models for a configuration without it."""
    base = ["model=tiny", "data.seq_length=64", "data.global_batch_size=16", "data.micro_batch_size=2"]
    assumed = dry_run(_cfg(*base), world_size=8, rank=0, assume_cp=4)
    real = dry_run(_cfg(*base, "parallel.cp=4"), world_size=8, rank=0)
    assert not real.cp_assumed and real.view.cp == 4 and real.layout["dp"] == 2 and real.layout["cp"] == 4
    assert real.state == assumed.state and real.view.num_microbatches == assumed.view.num_microbatches
    assert real.activations.tokens_per_microbatch == assumed.activations.tokens_per_microbatch
    assert real.traffic.by_group()["cp"].bytes == assumed.traffic.by_group()["cp"].bytes > 0


def test_paper_layout_with_cp_fits_once_the_optimizer_state_is_sharded():
    """The report's why-line: the configured replicate DP holds the whole AdamW state; sharded over the
    gradient groups the paper's layout is under 60 GiB."""
    overrides = [o.replace("data.global_batch_size=3584", "data.global_batch_size=1024") for o in PAPER_LAYOUT]
    report = dry_run(_cfg(*overrides), world_size=1792, rank=0, device=load_device("H800"), memory_limit_gib=60,
                     assume_cp=8)
    assert not report.fits
    with_zero1 = report.peak_bytes - report.state.optimizer + report.distributed_optimizer_bytes
    assert with_zero1 < 60 * 2**30
    assert any(p.startswith("why: parallel.dp_mode=replicate") for p in report.problems)
