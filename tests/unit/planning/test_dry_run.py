"""The dry run's report, its errors, the device presets, the sweep and the command line."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from longcat.bench import step_flops as bench_step_flops
from longcat.config.compose import compose_run_config
from longcat.config.validate import validate
from longcat.model.flops import step_flops
from longcat.planning import LayoutError, dry_run, load_device, sweep
from longcat.planning.dry_run import candidate_layouts
from longcat.planning.report import format_report, format_sweep
from longcat.planning.timing import GIB

ROOT = Path(__file__).resolve().parents[3]
PAPER_LAYOUT = ["model=longcat_flash", "moe.expected_ffn_experts=8", "parallel.ep=32", "parallel.pp=14",
                "parallel.pp_schedule=zbv", "data.seq_length=8192", "data.micro_batch_size=1",
                "data.global_batch_size=3584", "train.bf16=true", "train.activation_checkpointing=true"]
# docs/planning.md's walk-through: the paper's layout with CP 8 inside EP 32 and 1024 sequences per step
PAPER_CP8 = [*(o.replace("data.global_batch_size=3584", "data.global_batch_size=1024") for o in PAPER_LAYOUT),
             "parallel.cp=8"]


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
    assert re.search(r"exceeds H800 HBM 0\.001 GiB by 3\.\d GiB", report.problems[0]), report.problems[0]  # not "0.0"
    assert re.search(r"weights 0\.0\d+ \+ grads 0\.0\d+", report.problems[0]), report.problems[0]
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


def test_ep_traffic_follows_the_dispatcher():
    """All-to-all: k_e copies per token, (ep-1)/ep of them leave; all-gather: every token to ep-1 peers."""
    base = ("model=tiny", "parallel.ep=4", "moe.expected_ffn_experts=3", "data.global_batch_size=64")
    a2a, ag = (dry_run(_cfg(*base, f"parallel.moe_dispatcher={d}"), world_size=4, rank=0).traffic.by_group()["ep"]
               for d in ("alltoall", "allgather"))
    ratio = ag.bytes / a2a.bytes
    # per token: (ep-1)(D b + 4K) against k_e D b (ep-1)/ep, D = 128, b = 4, K = 4, ep = 4
    assert ratio == pytest.approx(3 * (128 * 4 + 16) / (3 * 128 * 4 * 3 / 4))


def test_sweep_ranks_fitting_layouts_by_step_time():
    rows = sweep(_cfg("model=tiny", "data.global_batch_size=64"), world_size=4, device=load_device("H800"))
    fitting = [r for r in rows if r.report is not None and r.report.fits]
    assert len(fitting) >= 2
    times = [r.report.time.step_s for r in fitting if r.report.time]
    assert times == sorted(times)
    assert "tok/s/dev" in format_sweep(rows)


def test_sweep_under_cp_runs_tp_without_sequence_parallelism_and_tries_fsdp():
    """cp with SP is refused, so a tp candidate under cp goes without SP; each layout is tried under
    replicate and, where validation allows it, FSDP."""
    cfg = _cfg("model=tiny", "parallel.cp=2", "data.seq_length=64", "data.global_batch_size=64")
    rows = sweep(cfg, world_size=8, device=load_device("H800"))
    with_tp = [r for r in rows if r.overrides["tp"] > 1]
    assert with_tp and not any(r.overrides["sequence_parallel"] for r in with_tp)
    assert all(r.report is not None for r in with_tp), [r.error for r in with_tp]
    assert {r.overrides["dp_mode"] for r in rows} == {"replicate", "fsdp"}
    plain = candidate_layouts(_cfg("model=tiny", "data.global_batch_size=64"), world_size=8)
    assert all(c["sequence_parallel"] == (c["tp"] > 1) for c in plain)  # without cp, tp keeps SP


@pytest.mark.parametrize("world_size,overrides", [
    (3, ["data.global_batch_size=24"]),  # ep=1: the ep sweep around 8 gives 4, 8, 16, none dividing 3
    (2, ["parallel.cp=2"]),
    (4, ["parallel=pp2_tp2"]),  # tp with PP: the sweep's own PP candidates run tp=1
])
def test_the_configured_layout_is_always_the_first_candidate(world_size, overrides):
    cfg = _cfg("model=tiny", *overrides)
    p = cfg.parallel
    first = candidate_layouts(cfg, world_size=world_size)[0]
    assert (first["pp"], first["tp"], first["ep"], first["pp_schedule"], first["dp_mode"]) == \
        (p.pp, p.tp, p.ep, str(p.pp_schedule), str(p.dp_mode))
    rows = sweep(cfg, world_size=world_size, device=load_device("H800"))
    assert any(r.report is not None and r.overrides["ep"] == p.ep for r in rows), [r.error for r in rows]


def test_sweep_with_no_candidates_says_why():
    with pytest.raises(LayoutError, match="no candidate layouts for world size 4: "):
        sweep(_cfg("model=tiny"), world_size=4, device=load_device("H800"), layouts=[])


def test_cli_sweep_exit_codes_without_a_valid_candidate():
    ok = _cli("--world-size", "3", "--device", "H800", "data.global_batch_size=24", "--sweep")
    assert ok.returncode == 0 and re.search(r"^ +1 +1 +1 +1 +3 replicate ", ok.stdout, flags=re.M), ok
    bad = _cli("--world-size", "3", "--device", "H800", "parallel.ep=4", "--sweep")
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert bad.stderr.startswith("error: no candidate layouts for world size 3: none of the 1 tried is valid")
    assert "parallel.ep=4 must divide dp*tp=3" in bad.stdout


def test_sweep_ranks_the_paper_layout_under_fsdp_where_only_fsdp_fits():
    """pp 14, ZB-V, cp 8, ep 32 on 1792 ranks: 71.7 GiB under replicate, 34.2 GiB under FSDP; the sweep
    tries both and ranks the FSDP one as fitting, with its DP mode in the table."""
    cfg = _cfg(*PAPER_CP8)
    layouts = [c for c in candidate_layouts(cfg, world_size=1792) if c["pp"] == 14 and c["ep"] == 32]
    assert sorted(c["dp_mode"] for c in layouts) == ["fsdp", "replicate"]
    rows = sweep(cfg, world_size=1792, device=load_device("H800"), memory_limit_gib=60, layouts=layouts)
    assert [(r.overrides["dp_mode"], r.report.fits) for r in rows] == [("fsdp", True), ("replicate", False)]
    assert rows[0].report.peak_bytes / GIB == pytest.approx(34.2, abs=0.05)
    assert rows[1].report.peak_bytes / GIB == pytest.approx(71.7, abs=0.05)
    table = format_sweep(rows, cp=8).splitlines()
    assert "dp_mode" in table[0] and " fsdp " in table[1] and " replicate " in table[2]
    assert table[0].split()[:5] == ["pp", "tp", "cp", "ep", "dp"]
    assert [line.split()[:5] for line in table[1:]] == [["14", "1", "8", "32", "16"]] * 2


def test_why_line_quotes_the_fsdp_dry_run_of_the_same_rank():
    """The replicate report's hint is the FSDP plan itself (sharded state, the stage's gathered units),
    not an estimate that disagrees with the dry run of parallel.dp_mode=fsdp."""
    h800 = load_device("H800")
    replicate = dry_run(_cfg(*PAPER_CP8), world_size=1792, rank=0, device=h800, memory_limit_gib=60)
    fsdp = dry_run(_cfg(*PAPER_CP8, "parallel.dp_mode=fsdp"), world_size=1792, rank=0, device=h800,
                   memory_limit_gib=60)
    why = [p for p in replicate.problems if p.startswith("why:")]
    assert len(why) == 1 and f"peaks at {fsdp.peak_bytes / GIB:.1f} GiB" in why[0] and "(fits)" in why[0], why
    assert f"gathered units {fsdp.gathered_bytes / GIB:.1f}" in why[0]
    assert replicate.fsdp_peak_bytes == fsdp.peak_bytes and replicate.to_dict()["bytes"]["peak_if_fsdp"]
    assert not any(p.startswith("why:") for p in fsdp.problems)


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


@pytest.mark.parametrize("where,needle", [
    ("missing/p.json", "the folder {tmp}/missing does not exist"),
    ("", "is a folder; give a file path"),
])
def test_cli_refuses_an_unwritable_json_path_before_any_work(tmp_path, where, needle):
    proc = _cli("--world-size", "1", "--json", str(tmp_path / where) if where else str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --json ") and needle.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def test_device_spec_missing_keys_are_named(tmp_path):
    spec = tmp_path / "devices.yaml"
    spec.write_text("X:\n  peak_tflops: 900\n")
    with pytest.raises(ValueError, match=r"device 'X' in .*: missing keys \['hbm_gib', 'inter_node_gbs', "
                                         r"'intra_node_gbs'\]"):
        load_device("X", spec_file=spec)
    assert load_device("X", spec_file=spec, hbm_gib=80, intra_node_gbs=400, inter_node_gbs=50).hbm_gib == 80
    proc = _cli("--world-size", "1", "--device", "X", "--device-spec", str(spec))
    assert proc.returncode == 2 and proc.stderr.startswith("error: device 'X'") and "missing keys" in proc.stderr


def test_cli_takes_overrides_before_between_and_after_its_flags(tmp_path):
    out = tmp_path / "report.json"
    proc = _cli("model=tiny", "--world-size", "2", "parallel.ep=2", "--json", str(out), "data.global_batch_size=32")
    assert proc.returncode == 0, proc.stderr
    layout = json.loads(out.read_text())["layout"]
    assert layout["ep"] == 2 and layout["global_batch_size"] == 32 and layout["dp"] == 2
    usage = _cli("--help").stdout
    assert "[overrides ...]" in usage and "before or after the flags" in usage


def _documented_commands() -> list[list[str]]:
    """The arguments of every ``python tools/dry_run.py`` command in README.md's and docs/planning.md's bash
    blocks (continuation lines joined, comments dropped; the synopsis with <placeholders> left out)."""
    commands = []
    for doc in ("README.md", "docs/planning.md"):
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                if tokens[:2] == ["python", "tools/dry_run.py"] and not any(t.startswith("<") for t in tokens):
                    commands.append(tokens[2:])
    return commands


def _dry_run_tool():
    """tools/dry_run.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("dry_run_tool", ROOT / "tools" / "dry_run.py")
    assert spec and spec.loader
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_documented_commands_compose_and_validate():
    """Each dry-run command the docs show parses and is a valid configuration for its world size (the
    README's tour line once lacked the batch settings its 1792 ranks need)."""
    tool = _dry_run_tool()
    commands = _documented_commands()
    assert len(commands) >= 4, commands
    for argv in commands:
        args, overrides = tool.parse_args(argv)
        cfg, _ = compose_run_config(args.recipe, overrides)
        validate(cfg, world_size=args.world_size)


def test_device_flags_without_a_device_are_refused_not_ignored(capsys):
    tool = _dry_run_tool()
    with pytest.raises(SystemExit) as exc:
        tool.parse_args(["--world-size", "8", "--hbm-gib", "80", "--peak-tflops", "900", "model=tiny"])
    assert exc.value.code == 2
    assert "--peak-tflops, --hbm-gib describe the device, but no --device is given" in capsys.readouterr().err
    args, _ = tool.parse_args(["--world-size", "8", "--hbm-gib", "80", "--device", "H800", "model=tiny"])
    assert args.hbm_gib == 80


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
    """The configured replicate DP holds the whole AdamW state; sharded over the gradient groups
    (``distributed_optimizer_bytes``, the JSON's optimizer_if_distributed) the paper's layout is under
    60 GiB, and the why-line's FSDP dry run (with the assumed cp) fits too."""
    overrides = [o.replace("data.global_batch_size=3584", "data.global_batch_size=1024") for o in PAPER_LAYOUT]
    report = dry_run(_cfg(*overrides), world_size=1792, rank=0, device=load_device("H800"), memory_limit_gib=60,
                     assume_cp=8)
    assert not report.fits
    with_zero1 = report.peak_bytes - report.state.optimizer + report.distributed_optimizer_bytes
    assert with_zero1 < 60 * 2**30
    assert any(p.startswith("why: parallel.dp_mode=replicate") for p in report.problems)
    assert report.fsdp_peak_bytes is not None and report.fsdp_peak_bytes < 60 * 2**30


def test_paper_layout_fits_60_gib_with_cp_and_fsdp():
    """The paper's layout as the stack runs it: CP=8 inside EP=32, ZB-V, FSDP2 over dp x cp. It fits
    under 60 GiB with the stage's units gathered for the whole step (FSDP under PP), and FSDP's traffic
    is one all-gather + one reduce-scatter per unit and step, not per micro-batch."""
    replicate = dry_run(_cfg(*PAPER_CP8), world_size=1792, rank=0, device=load_device("H800"),
                        memory_limit_gib=60, suggest_fsdp=False)
    fsdp = dry_run(_cfg(*PAPER_CP8, "parallel.dp_mode=fsdp"), world_size=1792, rank=0,
                   device=load_device("H800"), memory_limit_gib=60)
    assert not replicate.fits and fsdp.fits, fsdp.problems
    assert fsdp.shard.sharded_over_dp and fsdp.shard.whole_params > 0  # ZB-V's shared embedding stays whole
    gathered = 4 * (fsdp.shard.gathered_params + fsdp.shard.whole_params)
    assert fsdp.peak_bytes > fsdp.state.total + fsdp.activations.peak  # the gathered units are counted
    assert gathered <= replicate.state.weights + 4 * fsdp.shard.whole_params
    dp = fsdp.traffic.by_group()["dp"].bytes
    assert dp < 2 * replicate.traffic.by_group()["dp"].bytes, dp
