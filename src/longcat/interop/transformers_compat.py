"""What the installed ``transformers`` expects of a LongCat-Flash model, asked of transformers itself.

transformers has changed its LongCat-Flash tensors between releases (5.0 packed the experts as
``gate_up_proj [N+Z, 2I, D]`` with unused zero-expert rows and saved padded per-expert files; 5.25
packs the routed experts only, ``[N, 2I, D]``, and saves exactly the released tensor set). Rather than
assume one of them, this module builds ``transformers.LongcatFlashForCausalLM`` of the same config on
the meta device (nothing is allocated) and reads:

    in_memory   its ``state_dict()`` names and shapes: what ``load_state_dict(strict=True)`` takes
    on_disk     the same after ``transformers.core_model_loading.revert_weight_conversion``: the
                names and shapes ``save_pretrained`` writes and ``from_pretrained`` reads

``to_transformers_state_dict`` and the export's default layout follow them; a layout that no
``HFLayout`` produces is a ``TransformersLayoutError`` naming the transformers version and the tensor.

Shape legend: see ``longcat.model.hf_mapping``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Mapping

import torch

from longcat.config.schema import ModelConfig
from longcat.model.hf_mapping import (
    HFLayout,
    hf_config_dict,
    meta_state_dict,
    to_hf_state_dict,
)

Shapes = Mapping[str, tuple[int, ...]]


class TransformersLayoutError(ValueError):
    """The installed transformers expects LongCat-Flash tensors that our mapping does not produce."""


@dataclass(frozen=True)
class TransformersLayout:
    """The LongCat-Flash tensors of the installed transformers, for one config.

    version: ``transformers.__version__``.
    in_memory / on_disk: name -> shape (module docstring); no MTP tensors (transformers has no MTP head).
    packed_experts: rows of the in-memory ``mlp.experts.gate_up_proj`` (N, or N+Z in older releases).
    file_layout: the ``HFLayout`` whose expert tensors equal ``on_disk``.
    """

    version: str
    in_memory: dict[str, tuple[int, ...]]
    on_disk: dict[str, tuple[int, ...]]
    packed_experts: int
    file_layout: HFLayout


def _import_transformers():
    """transformers, or a ValueError saying how to get it (it is an optional dependency)."""
    try:
        import transformers  # noqa: PLC0415 - optional dependency, needed only for this layout
        from transformers.core_model_loading import revert_weight_conversion  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(
            f"the transformers layout needs transformers with LongcatFlash installed ({exc}); install the locked "
            "version (pip install -c requirements.lock transformers) or export --layout released") from None
    return transformers, revert_weight_conversion


def transformers_layout(cfg: ModelConfig) -> TransformersLayout:
    """The installed transformers' tensors for ``cfg`` (module docstring); cached per config.

    Raises:
        ValueError: transformers is not installed.
        TransformersLayoutError: its layout is one that no ``HFLayout`` matches (names the version and
            the first differing tensor).
    """
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _ask_transformers(cfg)
    return _LAYOUTS[key]


_LAYOUTS: dict[str, TransformersLayout] = {}


def _ask_transformers(cfg: ModelConfig) -> TransformersLayout:
    transformers, revert_weight_conversion = _import_transformers()
    with torch.device("meta"):
        model = transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(**hf_config_dict(cfg)))
    state = model.state_dict()
    in_memory = {k: tuple(v.shape) for k, v in state.items()}
    on_disk = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(state)).items()}
    version = transformers.__version__
    packed_experts = _packed_rows(in_memory, cfg=cfg, version=version)
    ours_meta = meta_state_dict(cfg)
    check_transformers_tensors(
        _shapes(to_hf_state_dict(ours_meta, cfg=cfg, layout=HFLayout.PACKED, include_mtp=False,
                                 packed_experts=packed_experts)),
        expected=in_memory, version=version, what="LongcatFlashForCausalLM.state_dict()")
    file_layout = _matching_file_layout(ours_meta, on_disk, cfg=cfg, version=version)
    return TransformersLayout(version=version, in_memory=in_memory, on_disk=on_disk,
                              packed_experts=packed_experts, file_layout=file_layout)


def to_transformers_state_dict(state_dict: dict[str, torch.Tensor], *, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``state_dict()`` -> what the installed ``transformers.LongcatFlashForCausalLM`` loads with
    ``load_state_dict(strict=True)`` (packed experts with its row count; no MTP head).

    Raises:
        ValueError / TransformersLayoutError: as ``transformers_layout``.
    """
    layout = transformers_layout(cfg)
    out = to_hf_state_dict(state_dict, cfg=cfg, layout=HFLayout.PACKED, include_mtp=False,
                           packed_experts=layout.packed_experts)
    check_transformers_tensors(_shapes(out), expected=layout.in_memory, version=layout.version,
                               what="LongcatFlashForCausalLM.state_dict()")
    return out


def check_transformers_tensors(found: Shapes, *, expected: Shapes, version: str, what: str) -> None:
    """Raise ``TransformersLayoutError`` unless ``found`` has exactly ``expected``'s names and shapes.

    The message names the transformers version, ``what`` was compared, and up to 4 tensors of each
    kind of difference (missing, unexpected, wrong shape).
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: transformers {expected[k]} vs ours {found[k]}"
             for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    problems = [f"{kind}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                for kind, items in (("tensors transformers has and we do not write", missing),
                                    ("tensors we write and transformers does not have", unexpected),
                                    ("wrong shapes", wrong)) if items]
    if problems:
        raise TransformersLayoutError(
            f"transformers {version} changed its LongCat-Flash tensor layout ({what}); " + "; ".join(problems)
            + ". Install the locked transformers (requirements.lock), or export --layout released")


def _packed_rows(in_memory: Shapes, *, cfg: ModelConfig, version: str) -> int:
    key = "model.layers.0.mlp.experts.gate_up_proj"
    if key not in in_memory:
        raise TransformersLayoutError(
            f"transformers {version} has no {key} (its LongCat-Flash experts are no longer packed); "
            "install the locked transformers (requirements.lock)")
    rows = in_memory[key][0]
    if rows not in (cfg.n_routed_experts, cfg.num_experts_total):
        raise TransformersLayoutError(
            f"transformers {version} packs {rows} experts in {key}, neither n_routed_experts="
            f"{cfg.n_routed_experts} nor n_routed_experts + zero_expert_num={cfg.num_experts_total}; "
            "install the locked transformers (requirements.lock)")
    return rows


def _matching_file_layout(ours_meta: dict[str, torch.Tensor], on_disk: Shapes, *, cfg: ModelConfig,
                          version: str) -> HFLayout:
    """The per-expert ``HFLayout`` whose tensors (MTP aside) are exactly ``on_disk``."""
    candidates = (HFLayout.PER_EXPERT, HFLayout.PER_EXPERT_PADDED)
    written = {layout: _shapes(to_hf_state_dict(ours_meta, cfg=cfg, layout=layout, include_mtp=False))
               for layout in candidates}
    for layout in candidates:
        if written[layout] == dict(on_disk):
            return layout
    check_transformers_tensors(written[HFLayout.PER_EXPERT], expected=on_disk, version=version,
                               what="the files save_pretrained writes")
    raise AssertionError("unreachable: check_transformers_tensors raised")  # pragma: no cover


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}
