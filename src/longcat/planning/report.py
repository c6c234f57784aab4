"""Text tables of dry-run reports (one rank; a sweep side by side)."""

from __future__ import annotations

from longcat.planning.dry_run import DryRunReport, SweepRow
from longcat.planning.timing import GIB

__all__ = ["format_report", "format_sweep"]


def _b(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def format_report(r: DryRunReport) -> str:
    """The report as an aligned two-column table."""
    s, lay = r.shard, r.layout
    passes = r.activations.in_flight_layer_passes
    rows: list[tuple[str, str]] = [
        ("layout", f"world {r.world_size} = pp {lay['pp']} x dp {lay['dp']} x cp {lay['cp']} x tp {lay['tp']}; "
                   f"experts: ep {lay['ep']} x edp {lay['edp']}; dp_mode {lay['dp_mode']}"
                   + (f"; schedule {lay['pp_schedule']}" if lay["pp_schedule"] else "")),
        *([("cp", f"{r.view.cp} assumed (--assume-cp; parallel.cp is not in this configuration): the dp ranks "
                  f"fold it, parameters are replicated over it, dense grads sum over {r.view.dense_grad_group}")]
          if r.cp_assumed else []),
        ("rank", f"{s.rank} (pp {s.pp_rank}, tp {s.tp_rank}, ep {s.ep_rank}); layers {list(s.local_layers)}"
                 + ("; first stage" if s.first_stage and s.dims.pp > 1 else "")
                 + ("; last stage" if s.last_stage and s.dims.pp > 1 else "")),
        ("micro-batch", f"{lay['micro_batch_size']} x {lay['seq_length']} tokens; {r.view.num_microbatches} per step; "
                        f"global batch {lay['global_batch_size']}; recompute "
                        f"{'every layer' if lay['activation_checkpointing'] else 'off'}; "
                        f"{'bf16 autocast' if lay['bf16'] else 'fp32'}"),
        ("model: total params", _b(r.model.total)),
        ("model: active / token", f"{_b(r.model.active_expected)} at K_e={r.model.k_e:g} FFN experts "
                                  f"(min {_b(r.model.active_min)}, max {_b(r.model.active_max)})"),
        ("rank params", f"{_b(s.params.total)}: dense {_b(s.params.dense)}, experts {_b(s.params.experts)}, "
                        f"embedding {_b(s.params.embedding)}, head {_b(s.params.head)}"),
        ("weights (fp32, = master)", _gib(r.state.weights)),
        ("gradients (fp32)", _gib(r.state.grads)),
        ("optimizer (AdamW fp32)", _gib(r.state.optimizer)),
        *([("master partition (DeepSpeed)", _gib(r.state.master))] if r.state.master else []),
        *([("gathered units (FSDP x PP)", _gib(r.gathered_bytes))] if r.gathered_bytes else []),
        ("activations / micro-batch", _gib(r.activations.per_microbatch)),
        ("activations at peak", f"{_gib(r.activations.peak)} ({passes:g} layer-passes in flight = "
                                f"{passes / len(s.local_layers):g} micro-batches through this rank's layers)"),
        ("peak memory / device", _gib(r.peak_bytes)
         + (f" (incl. {r.device.reserved_gib:g} GiB reserved) of {r.device.hbm_gib:g} GiB" if r.device else "")),
    ]
    for g in r.traffic.groups:
        if g.size > 1:
            ms = f"; {r.time.comm_s_by_group[g.group] * 1e3:.1f} ms" if r.time else ""
            rows.append((f"comm {g.group} (size {g.size})", f"{_gib(g.bytes)} / step{ms}"))
    rows.append(("model FLOPs / step", f"{r.step_model_flops:.4g}"))
    if r.time is not None:
        t = r.time
        rows += [
            ("modelled step", f"{t.step_s:.3f} s = compute {t.compute_s:.3f} + bubble {t.bubble_s:.3f} + "
                              f"exposed comm {t.exposed_comm_s:.3f} (EP hidden by ScMoE overlap {t.hidden_ep_s:.3f})"),
            ("tokens/s / device", f"{t.tokens_per_s_per_device:,.0f}"),
            ("MFU", f"{t.mfu * 100:.1f}%"),
        ]
    rows.append(("fits", "yes" if r.fits else "NO"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"problem: {p}" for p in r.problems]
    return "\n".join(lines)


def format_sweep(rows: list[SweepRow], *, cp: int = 1) -> str:
    """Candidates side by side: those that fit first, by modelled step time. ``cp``: the configured
    context-parallel degree, shown for rows that did not validate (a report shows its own)."""
    head = f"{'pp':>3} {'tp':>3} {'cp':>3} {'ep':>4} {'dp':>5} {'dp_mode':<9} {'schedule':<16} {'peak GiB':>9} " \
           f"{'step s':>8} {'tok/s/dev':>10} {'MFU':>6}  fits"
    lines = [head]
    for row in rows:
        o = row.overrides
        sched = o["pp_schedule"] if o["pp"] > 1 else "-"
        if row.report is None:
            lines.append(f"{o['pp']:>3} {o['tp']:>3} {cp:>3} {o['ep']:>4} {'-':>5} {o['dp_mode']:<9} {sched:<16} "
                         f"invalid: {row.error}")
            continue
        r, t = row.report, row.report.time
        assert t is not None  # a sweep always has a device
        lines.append(f"{o['pp']:>3} {o['tp']:>3} {r.layout['cp']:>3} {o['ep']:>4} {r.layout['dp']:>5} "
                     f"{o['dp_mode']:<9} {sched:<16} {r.peak_bytes / GIB:>9.1f} {t.step_s:>8.3f} "
                     f"{t.tokens_per_s_per_device:>10,.0f} {t.mfu * 100:>5.1f}%  {'yes' if r.fits else 'no'}")
    return "\n".join(lines)
