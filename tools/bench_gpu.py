"""MFU of a full bf16 training step on one GPU (prepared for an H200), as one short script (``make bench-gpu``).

    python tools/bench_gpu.py                      # on a CUDA machine: a few minutes, writes gpu_mfu.json
    python tools/bench_gpu.py --dry-run            # anywhere: config, FLOPs, and the same code path on CPU

The model is a ~1B-active LongCat-Flash: hidden 2048, 10 ScMoE layers, 16 MLA heads, 64 FFN + 32
zero experts, top-8, expert FFN 1024, dense FFN 4096, vocab 32768. ``count_parameters``: 4.89B total,
0.80B-1.30B active (1.14B at k_e = 5.33, uniform routing); fp32 weights, gradients and AdamW moments
take 78 GB of the H200's 141 GB (12 layers would take 94 GB and leave too little for the foreach
AdamW temporaries and activations). Batch 4 x 4096 tokens. A step is forward, loss, backward and
AdamW, under bf16 autocast with fp32 master weights (``train.bf16``); if that fails the script falls
back to a model cast to bf16 and says so. MFU = model FLOPs (``longcat.model.flops``, measured k_e)
/ median step time, divided by the GPU's bf16 matmul throughput measured at the step's own GEMM
shapes (``longcat.bench.matmul``), and also by the datasheet dense bf16 peak (H200 SXM: 989
TFLOP/s). Out of memory: the batch is halved once and the step retried. Whatever happens, the JSON
is written with what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from longcat.bench.common import BenchResult, Table, machine_info, median, write_result
from longcat.bench.matmul import measure_matmul_throughput
from longcat.bench.training import OursStep, make_batch
from longcat.config.schema import ModelConfig
from longcat.model import LongcatFlashForCausalLM, count_parameters, init_weights
from longcat.model.compile import compile_dense_blocks
from longcat.model.flops import gemm_shapes, step_flops
from longcat.tool_args import positive_int

ROOT = Path(__file__).resolve().parents[1]
DATASHEET_BF16_FLOP_PER_S = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}

GPU_MODEL = ModelConfig(
    vocab_size=32768, hidden_size=2048, num_layers=10, num_attention_heads=16, ffn_hidden_size=4096,
    q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=64, zero_expert_num=32, moe_topk=8, expert_ffn_hidden_size=1024,
    routed_scaling_factor=6.0, max_position_embeddings=8192,
)
# The same code path at CPU size, for --dry-run.
DRY_RUN_MODEL = dataclasses.replace(GPU_MODEL, vocab_size=1024, hidden_size=128, num_layers=2, num_attention_heads=2,
                                    ffn_hidden_size=256, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                                    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, zero_expert_num=4,
                                    moe_topk=4, expert_ffn_hidden_size=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: print the plan and run the code path on CPU, tiny")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--num-layers", type=positive_int, default=GPU_MODEL.num_layers)
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the dense blocks (train.compile); the warm-up steps absorb the compile")
    p.add_argument("--name", default="", help="result name (default gpu_mfu, gpu_mfu_compiled with --compile, "
                   "gpu_mfu_dryrun with --dry-run)")
    return p.parse_args(argv)


def build_model(cfg: ModelConfig, device: torch.device) -> LongcatFlashForCausalLM:
    """Built on the meta device and materialised on ``device`` (no host-side init of billions of weights)."""
    with torch.device("meta"):
        model = LongcatFlashForCausalLM(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    init_weights(model, cfg)
    return model.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_steps(cfg: ModelConfig, *, device: torch.device, batch_size: int, seq_len: int, warmup: int, steps: int,
              pure_bf16: bool, compiled: bool = False) -> dict:
    """Build, warm up and time ``steps`` training steps; returns times, k_e, losses and peak memory."""
    model = build_model(cfg, device)
    if pure_bf16:
        model = model.to(torch.bfloat16)
    if compiled:
        compile_dense_blocks(model)
    step = OursStep(model, batch=make_batch(cfg, batch_size=batch_size, seq_len=seq_len),
                    autocast_dtype=None if pure_bf16 else torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    k_e, losses, times = [], [], []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        out = step()  # returns Python floats: the step has finished on the device
        _sync(device)
        losses.append(out.loss)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            k_e.append(out.ffn_experts_per_token)  # the FLOPs of the timed steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    del step, model
    return {"step_s": times, "k_e": sum(k_e) / len(k_e), "losses": losses, "peak_gib": peak}


def measure(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> tuple[dict, list[str]]:
    """The step (bf16 autocast, else pure bf16; batch halved once on OOM) with notes on what happened."""
    notes, batch_size = [], args.batch_size
    for pure_bf16 in (False, True):
        mode = "bf16 weights + AdamW" if pure_bf16 else "bf16 autocast"
        for _ in range(2):
            out_of_memory = False
            try:
                out = run_steps(cfg, device=device, batch_size=batch_size, seq_len=args.seq_len, warmup=args.warmup,
                                steps=args.steps, pure_bf16=pure_bf16, compiled=args.compile)
                out.update(batch_size=batch_size, mode=mode)
                return out, notes
            except torch.OutOfMemoryError:
                notes.append(f"out of memory at batch {batch_size} x {args.seq_len} ({mode})")
                out_of_memory = True
            except Exception as exc:  # record it and try the next mode
                notes.append(f"{mode} step failed: {exc!r}")
                traceback.print_exc()
            _free(device)  # after the except block, which kept the failed step's frames alive
            if not out_of_memory:
                break
            batch_size = max(1, batch_size // 2)
    raise RuntimeError("; ".join(notes))


def summarise(cfg: ModelConfig, steps: dict, args: argparse.Namespace, device: torch.device) -> tuple[dict, Table]:
    """Metrics of the measured steps, with the bf16 matmul throughput measured now at their GEMM shapes."""
    k_e, t = steps["k_e"], median(steps["step_s"])
    flops = step_flops(cfg, batch_size=steps["batch_size"], seq_len=args.seq_len, ffn_experts_per_token=k_e)
    gemms = gemm_shapes(cfg, batch_size=steps["batch_size"], seq_len=args.seq_len, ffn_experts_per_token=k_e)
    mm = measure_matmul_throughput(gemms, dtype=torch.bfloat16, device=device,
                                   min_time_s=0.01 if args.dry_run else 0.05)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((v for k, v in DATASHEET_BF16_FLOP_PER_S.items() if k in gpu), None)
    metrics = {
        "batch_size": steps["batch_size"], "seq_len": args.seq_len, "step_s": t,
        "tokens_per_s": steps["batch_size"] * args.seq_len / t, "ffn_experts_per_token": k_e,
        "active_params_at_k_e": count_parameters(cfg).active_at(k_e), "model_flops_per_step": flops.total_flops,
        "achieved_flop_per_s": flops.total_flops / t, "matmul_bf16_flop_per_s": mm.flop_per_s,
        "mfu_vs_measured_matmul": flops.total_flops / t / mm.flop_per_s, "peak_memory_gib": steps["peak_gib"],
        "first_loss": steps["losses"][0], "last_loss": steps["losses"][-1],
    }
    if datasheet:
        metrics["mfu_vs_datasheet"] = flops.total_flops / t / datasheet
    rows = [[r.gemm.name, f"{r.gemm.batch}x{r.gemm.m}x{r.gemm.k}x{r.gemm.n}", f"{r.flop_per_s / 1e12:.2f}"]
            for r in sorted(mm.rates, key=lambda r: -r.gemm.model_flops)[:8]]
    return metrics, Table("Largest GEMMs and their measured bf16 rate", ["GEMM", "batch x m x k x n", "TFLOP/s"], rows)


def describe(cfg: ModelConfig, *, batch_size: int, seq_len: int) -> str:
    """Parameter counts and the FLOPs of one step at uniform routing (k_e = K * N / (N + Z))."""
    p = count_parameters(cfg)
    k_e = cfg.moe_topk * cfg.n_routed_experts / cfg.num_experts_total
    f = step_flops(cfg, batch_size=batch_size, seq_len=seq_len, ffn_experts_per_token=k_e)
    return (f"{p.total / 1e9:.3f}B total, {p.active_min / 1e9:.3f}-{p.active_max / 1e9:.3f}B active "
            f"({p.active_at(k_e) / 1e9:.3f}B at k_e = {k_e:.2f}); fp32 weights + grads + AdamW "
            f"{16 * p.total / 1e9:.1f} GB; one {batch_size} x {seq_len} step: {f.total_flops / 1e12:.3f} TFLOP")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        cfg = DRY_RUN_MODEL
        args.batch_size, args.seq_len, args.warmup, args.steps = 2, 64, 1, 1
    else:
        cfg = dataclasses.replace(GPU_MODEL, num_layers=args.num_layers)
    gpu_cfg = dataclasses.replace(GPU_MODEL, num_layers=args.num_layers)
    print("GPU model: " + describe(gpu_cfg, batch_size=4 if args.dry_run else args.batch_size,
                                   seq_len=4096 if args.dry_run else args.seq_len))
    if args.dry_run:
        print("dry-run model (CPU): " + describe(cfg, batch_size=args.batch_size, seq_len=args.seq_len))
    params = count_parameters(cfg)

    metrics: dict = {"total_params": params.total, "active_params_min": params.active_min,
                     "active_params_max": params.active_max}
    tables: list[Table] = []
    steps = None
    try:
        steps, notes = measure(cfg, args, device)
    except RuntimeError as exc:
        notes = [f"no step completed: {exc}"]
    if steps is not None:
        notes.append(f"mode: {steps['mode']}{', dense blocks compiled (train.compile)' if args.compile else ''}; "
                     f"{args.warmup} warm-up + {args.steps} timed steps")
        metrics.update(step_s=median(steps["step_s"]), batch_size=steps["batch_size"],
                       peak_memory_gib=steps["peak_gib"])
        _free(device)  # give the matmul measurement the memory the model held
        try:
            step_metrics, gemm_table = summarise(cfg, steps, args, device)
            metrics.update(step_metrics)
            tables.append(gemm_table)
        except Exception as exc:  # keep the step figures even if the matmul measurement fails
            notes.append(f"matmul throughput measurement failed: {exc!r}")
            traceback.print_exc()
    result = BenchResult(
        name=args.name or ("gpu_mfu_dryrun" if args.dry_run else "gpu_mfu_compiled" if args.compile else "gpu_mfu"),
        title="GPU: MFU of a bf16 training step (~1B active)" + (" [dry run on CPU]" if args.dry_run else ""),
        metrics=metrics, tables=tables, notes=notes, machine=machine_info(), wall_s=time.perf_counter() - start,
        settings={**vars(args), "output": str(args.output), "model": dataclasses.asdict(cfg)},
        mode="dry-run" if args.dry_run else "full")
    if not args.dry_run:
        print(f"wrote {write_result(result, args.output)}")
    print(json.dumps(result.metrics, indent=1))
    if args.dry_run:
        print("dry run: nothing written (on a CUDA machine the same script writes gpu_mfu.json)")
    return 0 if steps is not None else 1


if __name__ == "__main__":
    sys.exit(main())
