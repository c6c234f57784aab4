"""Device specs and the modelled step time, tokens/s and MFU of one layout.

Step time of one rank (seconds), a roofline-style sum of what cannot overlap::

    compute   = rank model FLOPs / (peak x achievable_fraction)  (x 4/3 with activation checkpointing:
                the recomputed forward is hardware work, not model FLOPs)
    bubble    = compute x (pp - 1) / (v M)  for 1F1B (v = 1) and interleaved 1F1B (v = 2);
                0 for ZB-V (zero bubble once M >= 2 pp, arXiv 2401.10241)
    exposed   = TP + CP + DP/EDP (replicate: after the backward) + EP not hidden
    EP hidden = with the ScMoE overlap (§2.2, §5.3) the all-to-alls run under the layer's dense work
                (MLA + dense FFNs + router): exposed EP = max(0, EP time - dense compute time);
                without the overlap it is all exposed
    step      = compute + bubble + exposed

Communication time: bytes over the bandwidth of the links the group spans. A group whose ranks are
consecutive (tp, cp, ep in this rank order) stays in one node while its span fits ``devices_per_node``;
otherwise ``(n - local) / (n - 1)`` of a rank's traffic crosses nodes at ``inter_node_gbs`` and the
slower part dominates. DP/EDP/PP groups stride across nodes: inter-node. Rank model FLOPs are the
step's model FLOPs (``longcat.model.flops``, zero experts = 0 FLOPs) divided evenly over the world (the
LM head's imbalance between pipeline stages is not modelled). MFU = model FLOPs of the step /
(step time x world size x peak).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from longcat.config.schema import PipelineSchedule, RunConfig
from longcat.planning.comm import StepTraffic

__all__ = ["DEVICE_PRESETS_FILE", "DeviceSpec", "StepTime", "load_device", "modelled_step_time"]

DEVICE_PRESETS_FILE = Path(__file__).with_name("devices.yaml")
GIB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: ``peak_tflops`` (dense bf16, 1e12 FLOP/s), ``hbm_gib`` (GiB), ``intra_node_gbs``
    and ``inter_node_gbs`` (GB/s, 1e9 bytes, one direction per device), ``devices_per_node``,
    ``achievable_fraction`` of the peak large GEMMs reach, ``reserved_gib`` taken before the model."""

    name: str
    peak_tflops: float
    hbm_gib: float
    intra_node_gbs: float
    inter_node_gbs: float
    devices_per_node: int = 8
    achievable_fraction: float = 0.6
    reserved_gib: float = 0.0

    def __post_init__(self) -> None:
        for key in ("peak_tflops", "hbm_gib", "intra_node_gbs", "inter_node_gbs", "devices_per_node"):
            if not getattr(self, key) > 0:
                raise ValueError(f"device {self.name!r}: {key}={getattr(self, key)!r} must be positive")
        if not 0 < self.achievable_fraction <= 1:
            raise ValueError(f"device {self.name!r}: achievable_fraction={self.achievable_fraction} must lie in (0, 1]")


def _presets(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read device specs from {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path} must map device names to their keys (see {DEVICE_PRESETS_FILE.name})")
    return data


def load_device(name: str, *, spec_file: Optional[Path] = None, **overrides: Optional[float]) -> DeviceSpec:
    """The device ``name`` from ``spec_file`` (default: the shipped presets), with ``overrides``
    (``None`` values ignored) applied.

    Raises:
        ValueError: an unknown name (listing the known ones), an unknown or bad key, a missing required key.
    """
    path = spec_file or DEVICE_PRESETS_FILE
    presets = _presets(path)
    if name not in presets:
        raise ValueError(f"unknown device {name!r}; {path} defines {', '.join(sorted(presets))} "
                         "(or give --device-spec FILE.yaml)")
    values = dict(presets[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(DeviceSpec)} - {"name"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"device {name!r} in {path}: unknown keys {unknown}; the keys are {sorted(known)}")
    required = {f.name for f in dataclasses.fields(DeviceSpec)
                if f.default is dataclasses.MISSING and f.name != "name"}
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"device {name!r} in {path}: missing keys {missing} (required: {sorted(required)}; "
                         f"optional: {sorted(known - required)})")
    return DeviceSpec(name=name, **values)


@dataclass(frozen=True)
class StepTime:
    """Modelled times of one step, seconds (module doc), and the throughput figures."""

    compute_s: float
    bubble_s: float
    exposed_comm_s: float
    comm_s_by_group: dict[str, float]
    hidden_ep_s: float
    step_s: float
    tokens_per_s_per_device: float
    mfu: float


def _group_seconds(group: str, size: int, nbytes: float, *, device: DeviceSpec, stride: int) -> float:
    if size <= 1 or nbytes <= 0:
        return 0.0
    span = size * stride
    if group in ("dp", "edp", "pp") or stride >= device.devices_per_node:
        return nbytes / (device.inter_node_gbs * 1e9)
    local = min(size, max(1, device.devices_per_node // stride))
    inter = (size - local) / (size - 1) if span > device.devices_per_node else 0.0
    return max(nbytes * (1 - inter) / (device.intra_node_gbs * 1e9), nbytes * inter / (device.inter_node_gbs * 1e9))


def modelled_step_time(run_cfg: RunConfig, *, traffic: StepTraffic, step_model_flops: float,
                       dense_flops_fraction: float, world_size: int, tp: int, pp: int, num_microbatches: int,
                       device: DeviceSpec) -> StepTime:
    """Step time, tokens/s per device and MFU (module doc).

    Args:
        traffic: this rank's ``step_traffic``.
        step_model_flops: model FLOPs of the whole step (all ranks, the global batch).
        dense_flops_fraction: share of a layer's FLOPs in its dense branch (what hides the EP exchange).
        world_size, tp, pp, num_microbatches: the layout's.
    """
    peak = device.peak_tflops * 1e12
    rank_flops = step_model_flops / world_size
    compute = rank_flops / (peak * device.achievable_fraction)
    if run_cfg.train.activation_checkpointing:
        compute *= 4 / 3
    bubble = 0.0
    if pp > 1:
        schedule = PipelineSchedule(run_cfg.parallel.pp_schedule)
        if schedule is not PipelineSchedule.zbv:
            bubble = compute * (pp - 1) / (schedule.stages_per_rank * num_microbatches)
    strides = {"tp": 1, "cp": tp, "ep": 1}
    seconds = {g.group: _group_seconds(g.group, g.size, g.bytes, device=device, stride=strides.get(g.group, 1))
               for g in traffic.groups}
    by = traffic.by_group()
    exposed = 0.0
    hidden_ep = 0.0
    for name, t in seconds.items():
        g = by[name]
        if name == "ep" and g.overlappable > 0:
            hidden_ep = min(t, compute * dense_flops_fraction)
            exposed += t - hidden_ep
        elif name in ("dp", "edp") and g.overlappable > 0:
            exposed += t * (1 - g.overlappable / g.bytes) if g.bytes else 0.0
        elif name == "pp":
            continue  # point-to-point sends overlap the next micro-batch's compute (bubble counted above)
        else:
            exposed += t
    step = compute + bubble + exposed
    tokens = run_cfg.data.global_batch_size * run_cfg.data.seq_length  # counted once across cp and tp
    return StepTime(compute_s=compute, bubble_s=bubble, exposed_comm_s=exposed, comm_s_by_group=seconds,
                    hidden_ep_s=hidden_ep, step_s=step, tokens_per_s_per_device=tokens / step / world_size,
                    mfu=step_model_flops / (step * world_size * peak))
