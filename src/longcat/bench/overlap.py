"""ScMoE overlap benchmark: how much of the expert-parallel all-to-all the dense branch hides.

Two ranks (ep=2, one process each) train a small LongCat-Flash model over a shaped link and measure,
with the ScMoE schedule off (sequential), on, on with 2 chunks of local experts and on with 2 chunks
of tokens (the paper's split), alternating the four in every round so that a slow spell hits all of
them:

- ``layer``: forward + backward of one ScMoE decoder layer; ``model``: forward + backward of the
  whole ``LongcatFlashForCausalLM`` (cross-entropy; no optimizer step, no dp gradient sync, which
  would add an all-reduce that this schedule does not touch).
- the time blocked in each all-to-all's ``wait()`` (``longcat.distributed.overlap.CommWaitRecorder``),
  by kind (dispatch / combine) and direction (forward / backward);
- the all-to-all time on its own: every exchange of the step (each layer's dispatch, combine and
  their gradients) with its real splits, timed alone after a barrier; and the wait time with the
  schedule off, where every exchange is waited for as soon as it is launched;
- the dense branch's compute time in each overlap window (FFN0 + MLA1 under the dispatch, FFN1
  under the combine; their backward under the gradients' exchanges), without communication.

Derived: exposed fraction = blocked time with overlap / all-to-all time on its own (forward and
backward); hideable time = sum over windows of min(comm, dense compute); saving = step time off - on
(median of per-round differences), and its share of the hideable time.

The link (``longcat.testing.netns.VethLink``): two network namespaces joined by a veth pair (10.200.x.1/30 and .2/30, on
that pair only), each end shaped by ``tc tbf`` to ``rate_mbit``; rank r runs in namespace r
(``ip netns exec``) with gloo bound to its veth end (GLOO_SOCKET_IFNAME, MASTER_ADDR = rank 0's
end). The namespaces are deleted afterwards, also on failure or interruption. Where they cannot be
made (no CAP_NET_ADMIN) the ranks run on loopback and every all-to-all is delayed to the same rate
by a stand-in link (``_EmulatedLink``: a serial link per rank, bytes sent to peers / rate, running
while compute goes on), and the result says so in its notes and ``settings.link``.

Entry point: ``tools/bench_overlap.py`` (``python tools/bench_overlap.py --help``); writes
``benchmarks/results/overlap.json`` (a ``BenchResult``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longcat.bench.common import BenchResult, Table, machine_info, write_result
from longcat.config.schema import ModelConfig
from longcat.distributed import ParallelDims, ProcessGroups
from longcat.distributed.collectives import all_to_all_uneven, exchange_counts
from longcat.distributed.overlap import CommWaitRecorder, record_comm_waits
from longcat.model import DecoderLayer, LongcatFlashForCausalLM
from longcat.model.moe.dispatch import AllToAllTokenDispatcher, TokenChunkedTokenDispatcher, count_by_expert
from longcat.model.parallel.expert_parallel import (
    apply_expert_parallel,
    apply_moe_overlap,
)
from longcat.testing.distributed import find_free_port
from longcat.testing.netns import VethLink

logger = logging.getLogger(__name__)

SCHEDULES = {  # name: (overlap, chunks, chunk dimension)
    "off": (False, 1, "expert"),
    "on": (True, 1, "expert"),
    "on_chunks2": (True, 2, "expert"),
    "on_chunks2_token": (True, 2, "token"),
}
KEYS = ("dispatch.forward", "combine.forward", "combine.backward", "dispatch.backward")


@dataclass(frozen=True)
class OverlapBenchSettings:
    """The model, batch and link of the benchmark (``--help`` of ``tools/bench_overlap.py``)."""

    hidden_size: int = 256
    num_layers: int = 2
    ffn_hidden_size: int = 2048
    num_attention_heads: int = 8
    n_routed_experts: int = 8
    zero_expert_num: int = 4
    moe_topk: int = 4
    expert_ffn_hidden_size: int = 256
    vocab_size: int = 2048
    batch_size: int = 2
    seq_len: int = 256
    rounds: int = 11
    warmup: int = 1
    threads: int = 1
    rate_mbit: float = 600.0
    link: str = "veth"  # veth | emulated (loopback + stand-in delay)

    def model_config(self) -> ModelConfig:
        head = self.hidden_size // self.num_attention_heads
        cfg = ModelConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
            q_lora_rank=self.hidden_size // 2, kv_lora_rank=self.hidden_size // 4, qk_nope_head_dim=head,
            qk_rope_head_dim=head // 2, v_head_dim=head, n_routed_experts=self.n_routed_experts,
            zero_expert_num=self.zero_expert_num, moe_topk=self.moe_topk,
            expert_ffn_hidden_size=self.expert_ffn_hidden_size,
        )
        cfg.validate()
        return cfg


# ----------------------------------------------------------------------------------- rank side


def _now() -> float:
    return time.perf_counter()


def _waits(recorder) -> dict[str, float]:
    totals = recorder.totals()
    return {key: totals[key].blocked_s if key in totals else 0.0 for key in KEYS}


def _layer_step(layer, h_BSD, g_BSD, rope) -> None:
    h = h_BSD.detach().requires_grad_()
    out_BSD, _ = layer(h, cos_BSP=rope[0], sin_BSP=rope[1])
    out_BSD.backward(g_BSD)


def _model_step(model, ids_BS, labels_BS) -> None:
    logits_BSV = model(ids_BS).logits_BSV
    F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten()).backward()


def _timed_step(step: Callable[[], None], barrier: Callable[[], None]) -> tuple[float, dict[str, float]]:
    barrier()
    recorder = CommWaitRecorder()
    start = _now()
    with record_comm_waits(recorder):
        step()
    return _now() - start, _waits(recorder)


def _dense_windows(layer, h_BSD, g_BSD, rope) -> dict[str, float]:
    """Seconds of the dense work in each overlap window, forward and backward, with no communication."""
    h0 = h_BSD.detach().requires_grad_()
    u = layer.post_attention_layernorm[0](h0).detach().requires_grad_()
    t0 = _now()
    h1 = h0 + layer.mlps[0](u)
    h1 = h1 + layer.self_attn[1](layer.input_layernorm[1](h1), cos_BSP=rope[0], sin_BSP=rope[1])
    t1 = _now()
    h2 = h1.detach().requires_grad_()
    ffn1 = layer.mlps[1](layer.post_attention_layernorm[1](h2))
    t2 = _now()
    ffn1.backward(g_BSD)
    t3 = _now()
    h1.backward(g_BSD + h2.grad)
    t4 = _now()
    return {
        "dispatch.forward": t1 - t0, "combine.forward": t2 - t1,
        "combine.backward": t3 - t2, "dispatch.backward": t4 - t3,
    }


def _exchanges_alone(moe, u_BSD, groups) -> dict[str, float]:
    """Seconds of each of one MoE's four exchanges (``KEYS``) for input u_BSD, with its real splits,
    one at a time (a barrier before each), nothing else running."""
    with torch.no_grad():
        ids_TK = moe.router(u_BSD.reshape(-1, u_BSD.shape[-1])).expert_ids_TK
        exchanged = exchange_counts(count_by_expert(ids_TK, num_experts=moe.num_ffn_experts), group=groups.ep_group)
        sent, received = exchanged.input_splits, exchanged.output_splits
        out_SD = torch.randn(sum(sent), u_BSD.shape[-1])
        back_RD = torch.randn(sum(received), u_BSD.shape[-1])
        seconds = {}
        # dispatch and the combine's gradient send the S rows out; the combine and the dispatch's
        # gradient send the R rows back
        for key, rows, splits in (("dispatch.forward", out_SD, (sent, received)),
                                  ("combine.forward", back_RD, (received, sent)),
                                  ("combine.backward", out_SD, (sent, received)),
                                  ("dispatch.backward", back_RD, (received, sent))):
            dist.barrier(group=groups.ep_group)
            start, cpu_start = _now(), time.process_time()
            all_to_all_uneven(rows, input_splits=splits[0], output_splits=splits[1], group=groups.ep_group)
            seconds[key] = _now() - start
            seconds[f"{key}.cpu"] = time.process_time() - cpu_start  # this process, all its threads
        return seconds


def _all_to_all_alone(model, layer, h_BSD, ids_BS, groups) -> dict[str, dict[str, float]]:
    """Per key seconds of the exchanges alone, for the layer step and summed over the model step's
    layers: each MoE's input is captured by a forward pre-hook in a no-grad forward, then its
    exchanges are timed alone."""
    inputs = []
    hooks = [lyr.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for lyr in model.model.layers]
    try:
        with torch.no_grad():
            model(ids_BS)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        u_BSD = layer.post_attention_layernorm[0](h_BSD)
    per_layer = [_exchanges_alone(lyr.mlp, u, groups) for lyr, u in zip(model.model.layers, inputs)]
    return {
        "layer": _exchanges_alone(layer.mlp, u_BSD, groups),
        "model": {key: sum(seconds[key] for seconds in per_layer) for key in per_layer[0]},
    }


def run_rank(settings: OverlapBenchSettings, *, groups: ProcessGroups) -> dict[str, Any]:
    """One rank's measurements (``groups``: ``ProcessGroups`` with every rank in ep, world size 2).
    Returns medians over rounds: step seconds and blocked seconds per key, per schedule, for ``layer``
    and ``model``; the dense windows; the all-to-all on its own; rows exchanged."""
    torch.set_num_threads(settings.threads)
    cfg = settings.model_config()
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg)
    apply_expert_parallel(model, groups=groups)
    B, S, D = settings.batch_size, settings.seq_len, cfg.hidden_size
    gen = torch.Generator().manual_seed(100 + groups.rank)
    ids_BS = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    labels_BS = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    h_BSD, g_BSD = torch.randn(B, S, D, generator=gen), torch.randn(B, S, D, generator=gen) / (B * S)
    layer = model.model.layers[0]
    assert isinstance(layer, DecoderLayer)
    rope = model.model.rotary_emb(None, seq_len=S, device=h_BSD.device, dtype=h_BSD.dtype)
    barrier = lambda: dist.barrier(group=groups.ep_group)  # noqa: E731

    samples: dict[str, dict[str, list]] = {
        f"{what}.{name}": {"step_s": [], **{key: [] for key in KEYS}}
        for what in ("layer", "model")
        for name in SCHEDULES
    }
    dense: dict[str, list[float]] = {key: [] for key in KEYS}
    alone: dict[str, dict[str, list[float]]] = {
        what: {k: [] for key in KEYS for k in (key, f"{key}.cpu")} for what in ("layer", "model")
    }
    for round_index in range(settings.warmup + settings.rounds):
        record = round_index >= settings.warmup
        for name, (overlap_on, chunks, chunk_dim) in SCHEDULES.items():
            apply_moe_overlap(model, overlap=overlap_on, num_chunks=chunks, chunk_dim=chunk_dim)
            for what, step in (("layer", lambda: _layer_step(layer, h_BSD, g_BSD, rope)),
                               ("model", lambda: _model_step(model, ids_BS, labels_BS))):
                step_s, waits = _timed_step(step, barrier)
                model.zero_grad(set_to_none=True)
                if record:
                    entry = samples[f"{what}.{name}"]
                    entry["step_s"].append(step_s)
                    for key, value in waits.items():
                        entry[key].append(value)
        barrier()
        windows = _dense_windows(layer, h_BSD, g_BSD, rope)
        model.zero_grad(set_to_none=True)
        barrier()
        alone_s = _all_to_all_alone(model, layer, h_BSD, ids_BS, groups)
        if record:
            for what, seconds in alone_s.items():
                for key, value in seconds.items():
                    alone[what][key].append(value)
            for key, value in windows.items():
                dense[key].append(value)
    dispatcher = layer.mlp.dispatcher
    assert isinstance(dispatcher, (AllToAllTokenDispatcher, TokenChunkedTokenDispatcher))  # apply_moe_overlap's
    counters = dispatcher.counters()
    return {
        "rank": groups.rank,
        "samples": {k: {key: statistics.median(v) for key, v in entry.items()} for k, entry in samples.items()},
        "step_s_per_round": {k: entry["step_s"] for k, entry in samples.items()},
        "dense_s": {key: statistics.median(v) for key, v in dense.items()},
        "all_to_all_alone_s": {what: {k: statistics.median(v) for k, v in d.items()} for what, d in alone.items()},
        "rows_per_dispatch": counters.dispatched_rows / max(counters.num_dispatches, 1),
    }


class _EmulatedLink:
    """A stand-in for a slow link on loopback: every ``all_to_all_single`` to peers takes at least
    (bytes to peers) / rate after the previous one on this rank ends, while compute goes on."""

    def __init__(self, rate_mbit: float) -> None:
        self.bytes_per_s = rate_mbit * 1e6 / 8
        self.free_at = 0.0
        self._real = dist.all_to_all_single

    def install(self) -> None:
        link = self

        class _DelayedWork:
            def __init__(self, work, done_at):
                self._work, self._done_at = work, done_at

            def wait(self, *args):
                self._work.wait(*args)
                time.sleep(max(0.0, self._done_at - _now()))
                return True

            def is_completed(self):
                return self._work.is_completed() and _now() >= self._done_at

        def delayed(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            work = link._real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            me = dist.get_rank(group)
            rows = input.shape[0] if input_split_sizes is None else sum(
                s for g, s in enumerate(input_split_sizes) if g != me)
            row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
            link.free_at = max(_now(), link.free_at) + rows * row_bytes / link.bytes_per_s
            if not async_op:
                time.sleep(max(0.0, link.free_at - _now()))
                return work
            return _DelayedWork(work, link.free_at)

        dist.all_to_all_single = delayed


def worker_main(settings: OverlapBenchSettings, out_path: Path) -> None:
    """A rank's process: gloo from the environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
    GLOO_SOCKET_IFNAME), measure, write this rank's JSON to ``out_path``."""
    import datetime


    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=300))
    try:
        world_size = int(os.environ["WORLD_SIZE"])
        groups = ProcessGroups.build(ParallelDims(world_size, ep=world_size))
        if settings.link == "emulated":
            _EmulatedLink(settings.rate_mbit).install()
        result = run_rank(settings, groups=groups)
        dist.barrier(group=groups.world_group)
        out_path.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- summary


def _window_metrics(ranks, what: str, *, num_layers: int) -> tuple[dict[str, float], list[list]]:
    """Metrics and table rows of one step kind (``layer`` or ``model``)."""

    def mean(get) -> float:
        return sum(get(r) for r in ranks) / len(ranks)

    # Both ranks' steps wait for the slower side of an exchange (the one receiving more rows).
    alone = {key: max(r["all_to_all_alone_s"][what][key] for r in ranks) for key in KEYS}
    waited_off = {key: mean(lambda r, k=key: r["samples"][f"{what}.off"][k]) for key in KEYS}
    windows = {key: mean(lambda r, k=key: r["dense_s"][k]) * num_layers for key in KEYS}
    hideable = sum(min(alone[key], windows[key]) for key in KEYS)
    off_s = mean(lambda r: r["samples"][f"{what}.off"]["step_s"])
    off_min_s = mean(lambda r: min(r["step_s_per_round"][f"{what}.off"]))
    fwd_keys, bwd_keys = KEYS[:2], KEYS[2:]
    m = {
        "step_off_s": off_s,
        "step_off_min_s": off_min_s,
        "all_to_all_alone_s": sum(alone.values()),
        "all_to_all_alone_forward_s": sum(alone[k] for k in fwd_keys),
        "all_to_all_alone_backward_s": sum(alone[k] for k in bwd_keys),
        "all_to_all_alone_cpu_s": mean(lambda r: sum(r["all_to_all_alone_s"][what][f"{k}.cpu"] for k in KEYS)),
        "all_to_all_waited_off_s": sum(waited_off.values()),
        "dense_window_compute_s": sum(windows.values()),
        "comm_to_compute_ratio": sum(alone.values()) / max(sum(windows.values()), 1e-12),
        "max_window_comm_to_compute_ratio": max(alone[k] / max(windows[k], 1e-12) for k in KEYS),
        "hideable_s": hideable,
    }
    rows = []
    for name in ("on", "on_chunks2", "on_chunks2_token"):
        sample = {key: mean(lambda r, k=key, n=name: r["samples"][f"{what}.{n}"][k]) for key in ("step_s", *KEYS)}
        fwd, bwd = sum(sample[k] for k in fwd_keys), sum(sample[k] for k in bwd_keys)
        min_s = mean(lambda r, n=name: min(r["step_s_per_round"][f"{what}.{n}"]))
        saving = off_min_s - min_s  # other jobs only add time: the fastest round is the step's own time
        # Also paired by round (the schedules alternate within a round), so a slow spell cancels out.
        paired = mean(lambda r, n=name: statistics.median(
            off - on for off, on in zip(r["step_s_per_round"][f"{what}.off"], r["step_s_per_round"][f"{what}.{n}"])
        ))
        m |= {
            f"{name}.step_s": sample["step_s"],
            f"{name}.step_min_s": min_s,
            f"{name}.exposed_s": fwd + bwd,
            f"{name}.exposed_fraction": (fwd + bwd) / max(m["all_to_all_alone_s"], 1e-12),
            f"{name}.exposed_fraction_forward": fwd / max(m["all_to_all_alone_forward_s"], 1e-12),
            f"{name}.exposed_fraction_backward": bwd / max(m["all_to_all_alone_backward_s"], 1e-12),
            f"{name}.saving_s": saving,
            f"{name}.saving_paired_median_s": paired,
            f"{name}.saving_of_hideable": saving / max(hideable, 1e-12),
        }
        rows.append([
            what, name, min_s * 1e3, off_min_s * 1e3, sample["step_s"] * 1e3, off_s * 1e3,
            m["all_to_all_alone_s"] * 1e3, (fwd + bwd) * 1e3, m[f"{name}.exposed_fraction_forward"],
            m[f"{name}.exposed_fraction_backward"], saving * 1e3, paired * 1e3, hideable * 1e3,
            m[f"{name}.saving_of_hideable"],
        ])
    return {f"{what}.{k}": v for k, v in m.items()}, rows


def summarise(ranks: list[dict[str, Any]], settings: OverlapBenchSettings, *, link_note: str):
    """The BenchResult of the two ranks' measurements (means over the ranks of their medians)."""
    metrics: dict[str, float] = {}
    rows = []
    for what, num_layers in (("layer", 1), ("model", settings.num_layers)):
        step_metrics, step_rows = _window_metrics(ranks, what, num_layers=num_layers)
        metrics |= step_metrics
        rows += step_rows
    metrics["rows_per_dispatch"] = sum(r["rows_per_dispatch"] for r in ranks) / len(ranks)
    metrics["rate_mbit"] = settings.rate_mbit
    columns = ["step", "schedule", "step min ms", "off min ms", "step median ms", "off median ms", "a2a alone ms",
               "a2a waited ms", "exposed fwd", "exposed bwd", "saving ms", "saving paired median ms", "hideable ms",
               "saving / hideable"]
    window_rows = [
        [key, *(r["dense_s"][key] * 1e3 for r in ranks), *(r["all_to_all_alone_s"]["layer"][key] * 1e3 for r in ranks)]
        for key in KEYS
    ]
    window_columns = ["window", *(f"dense r{r['rank']} ms" for r in ranks), *(f"a2a r{r['rank']} ms" for r in ranks)]
    wait_rows = [
        [what, key, *(r["samples"][f"{what}.{name}"][key] * 1e3 for name in SCHEDULES for r in ranks)]
        for what in ("layer", "model") for key in KEYS
    ]
    wait_columns = ["step", "wait", *(f"{name} r{r['rank']} ms" for name in SCHEDULES for r in ranks)]
    notes = [
        link_note,
        "a2a alone: each exchange of the step (dispatch, combine, combine grad, dispatch grad of every layer) "
        "with its real splits, timed on its own after a barrier, the slower rank's time (all_to_all_alone_cpu_s: "
        "the CPU time the rank process spent meanwhile, gloo's threads included; on a CPU host that part "
        "competes with compute when overlapped). Schedule off waits for every exchange at once "
        "(all_to_all_waited_off_s); on a loaded machine that also includes the peer's lateness and the wake-up.",
        "exposed fraction = time blocked in wait() with the schedule on / a2a alone (forward: dispatch + "
        "combine; backward: their gradients); hideable = sum over the four windows of min(a2a alone, dense "
        "compute of the window); saving = fastest round off - fastest round on (other jobs on the machine only "
        "ever add time); also the median over rounds of (off - on), the schedules of a round running back to back.",
        "A step is forward + backward (no optimizer step, no dp gradient sync). Values are means over the "
        "two ranks of medians over rounds; the four schedules alternate within each round. on_chunks2 splits "
        "each exchange by local expert, on_chunks2_token by token (the paper's split).",
    ]
    return BenchResult(
        name="overlap",
        title="ScMoE overlap: all-to-all hidden behind the dense branch (ep=2, 2 processes)",
        metrics={k: float(v) for k, v in metrics.items()},
        tables=[
            Table("Step time and exposed all-to-all", columns, rows),
            Table("Per window of the layer: dense compute vs a2a alone (ms, median over rounds)", window_columns,
                  window_rows),
            Table("Blocked in wait() per rank (ms, median over rounds)", wait_columns, wait_rows),
        ],
        settings=dataclasses.asdict(settings),
        notes=notes,
    )


# ----------------------------------------------------------------------------------- launcher


def _rank_commands(settings: OverlapBenchSettings, link: Optional[VethLink], outs: list[Path]) -> list[tuple]:
    port = str(find_free_port())
    flags = [f"--{f.name.replace('_', '-')}={getattr(settings, f.name)}" for f in dataclasses.fields(settings)]
    commands = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_PORT=port,
                   OMP_NUM_THREADS=str(settings.threads),
                   MASTER_ADDR=link.addresses[0] if link else "127.0.0.1",
                   GLOO_SOCKET_IFNAME=link.devices[rank] if link else "lo")
        cmd = [sys.executable, "-m", "longcat.bench.overlap", *flags, f"--worker-out={outs[rank]}"]
        if link is not None:
            cmd = ["ip", "netns", "exec", link.namespaces[rank], *cmd]
        commands.append((cmd, env))
    return commands


def _run_ranks(settings: OverlapBenchSettings, link: Optional[VethLink], *, timeout_s: float) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
        outs = [Path(tmp) / f"rank{rank}.json" for rank in range(2)]
        procs = [subprocess.Popen(cmd, env=env) for cmd, env in _rank_commands(settings, link, outs)]
        try:
            deadline = time.monotonic() + timeout_s
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        codes = [proc.returncode for proc in procs]
        if any(codes) or not all(out.exists() for out in outs):
            raise RuntimeError(f"a rank failed (exit codes {codes}); see its output above")
        return [json.loads(out.read_text()) for out in outs]


def run(settings: OverlapBenchSettings, *, output_dir: Path, timeout_s: float = 1800.0):
    """Build the link, run both ranks, write ``output_dir/overlap.json``; returns the BenchResult.

    Falls back to the emulated link (and says so) when ``settings.link == "veth"`` and the
    namespaces cannot be made."""
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the link is removed
    try:
        if settings.link == "veth":
            try:
                with VethLink(settings.rate_mbit) as link:
                    ranks = _run_ranks(settings, link, timeout_s=timeout_s)
                note = (f"link: veth pair between two network namespaces ({link.addresses[0]}/30 - "
                        f"{link.addresses[1]}), tc tbf {settings.rate_mbit} Mbit/s each way; gloo over it.")
            except PermissionError as err:
                logger.warning("%s; falling back to loopback with an emulated link", err)
                settings = dataclasses.replace(settings, link="emulated")
        if settings.link == "emulated":
            ranks = _run_ranks(settings, None, timeout_s=timeout_s)
            note = (f"link: EMULATED - network namespaces unavailable; loopback with every all-to-all delayed "
                    f"to {settings.rate_mbit} Mbit/s (bytes to peers / rate, serial per rank, concurrent with "
                    "compute).")
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = summarise(ranks, settings, link_note=note)
    result.machine = machine_info()
    result.wall_s = time.monotonic() - started
    write_result(result, output_dir)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """``tools/bench_overlap.py``: run the benchmark, print and write the JSON."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings, args = parse_settings(argv)
    result = run(settings, output_dir=args.output)
    print(json.dumps({"metrics": result.metrics, "notes": result.notes}, indent=2))
    print(f"wrote {args.output / 'overlap.json'}")
    return 0


def parse_settings(argv: Optional[list[str]] = None) -> tuple[OverlapBenchSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(OverlapBenchSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = OverlapBenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(OverlapBenchSettings)})
    if settings.link not in ("veth", "emulated"):
        parser.error(f"--link {settings.link!r}: use veth or emulated")
    return settings, args


if __name__ == "__main__":  # a rank process, started by ``run``
    _settings, _args = parse_settings()
    worker_main(_settings, _args.worker_out)
