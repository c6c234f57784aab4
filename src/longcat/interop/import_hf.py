"""Import a Hugging Face LongCat-Flash folder as a longcat checkpoint.

Reads ``config.json`` (``model_type`` must be ``longcat_flash``) and the safetensors files (listed by
``model.safetensors.index.json``, else ``model.safetensors``, else every ``*.safetensors``) in any
``HFLayout``: the released per-expert tensors (also what transformers 5.25 saves), transformers 5.0's
``save_pretrained`` output (per-expert plus zero rows for the zero experts), or transformers' in-memory
packed ``gate_up_proj`` (N rows as in 5.25, or N+Z as in 5.0). Every
name and shape is checked against the config before anything is written. The result is one
checkpoint folder in ``CheckpointManager``'s format:

    .metadata, *.distcp    DCP, ``model.<our parameter names>``, fp32 (the trainer's master weights);
                           no optimizer state
    trainer_state.pt       ``{"step": 0, "tokens_seen": 0.0, "config": {"model": {...}}, "imported_from"}``
    tokenizer files        copied when the folder has them

Start a run from it with ``train.init_from=DIR`` (the run's ``model.*`` must equal the imported
config), or load it with ``CheckpointManager.load(DIR, model=..., optimizer=None)``. It is a weights
checkpoint, not a resumable one: do not place it under a run's ``checkpoints/``.

Shape legend: see ``longcat.model.hf_mapping``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from longcat.config.schema import ModelConfig
from longcat.interop.export_hf import (
    INDEX_FILE,
    atomic_output_dir,
    check_output_free,
    check_tensor_shapes,
    single_process_dcp,
)
from longcat.model.hf_mapping import (
    HFLayout,
    from_hf_state_dict,
    meta_state_dict,
    model_config_from_hf,
    to_hf_state_dict,
)
from longcat.train.checkpoint import TRAINER_STATE

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ImportResult:
    """output: the checkpoint folder written; config: the imported model config; layout: the expert
    layout found in the files; num_tensors: tensors written (our names)."""

    output: Path
    config: ModelConfig
    layout: HFLayout
    num_tensors: int


def read_hf_config(folder: Path) -> dict:
    """``config.json`` of an HF folder as a dict.

    Raises:
        ValueError: the file is missing or is not JSON.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot parse {path}: {e}") from e


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: those the index names, else ``model.safetensors``, else all.

    Raises:
        ValueError: no safetensors file, or the index names a file that is not there.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} names files that are missing: {absent}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors weights")
    return files


def hf_tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over ``files``, from the headers only.

    Raises:
        ValueError: a tensor name appears in two files.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in shapes:
                    raise ValueError(f"tensor {name} appears in more than one file (second: {path.name})")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def expected_hf_shapes(
    cfg: ModelConfig, *, layout: HFLayout, packed_experts: int | None = None
) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The tensor names and shapes an HF folder of ``cfg`` holds in ``layout``, and which of them may be
    absent (the zero-expert padding, the MTP embedding copy, a tied ``lm_head.weight``). PER_EXPERT
    and PER_EXPERT_PADDED give the same answer (the padding is optional). ``packed_experts``: PACKED's
    ``gate_up_proj`` rows (None: N)."""
    meta = meta_state_dict(cfg)
    packed = layout == HFLayout.PACKED
    full_layout = HFLayout.PACKED if packed else HFLayout.PER_EXPERT_PADDED
    expected = {k: tuple(t.shape) for k, t in
                to_hf_state_dict(meta, cfg=cfg, layout=full_layout, packed_experts=packed_experts).items()}
    optional = {"model.mtp.embed_tokens.weight"}
    if not packed:
        optional |= set(expected) - set(to_hf_state_dict(meta, cfg=cfg, layout=HFLayout.PER_EXPERT))
    if cfg.tie_word_embeddings:
        optional.add("lm_head.weight")
    return expected, optional


def packed_rows(shapes: dict[str, tuple[int, ...]], *, cfg: ModelConfig) -> int | None:
    """Rows of a PACKED folder's ``gate_up_proj`` when they are a count transformers has used (N: 5.25,
    N+Z: 5.0), else None (then the shape check reports the tensor with the expected N rows)."""
    rows = {shape[0] for name, shape in shapes.items() if name.endswith(".mlp.experts.gate_up_proj") and shape}
    if len(rows) == 1 and (row := rows.pop()) in (cfg.n_routed_experts, cfg.num_experts_total):
        return row
    return None


def detect_layout(names: set[str], *, cfg: ModelConfig) -> HFLayout:
    if any(name.endswith(".mlp.experts.gate_up_proj") for name in names):
        return HFLayout.PACKED
    padded = f"model.layers.0.mlp.experts.{cfg.n_routed_experts}.gate_proj.weight"
    return HFLayout.PER_EXPERT_PADDED if padded in names else HFLayout.PER_EXPERT


def load_hf_checkpoint(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], HFLayout]:
    """Read an HF LongCat-Flash folder into our config and our state dict (fp32, our names).

    Returns:
        (config, state dict with exactly our model's keys, expert layout found).

    Raises:
        ValueError: ``config.json`` is missing, not ``longcat_flash`` or asks for an unsupported
            feature; or a tensor is unknown, missing or wrongly shaped (each named, with the expected
            and found shapes). Checked from the file headers, before any tensor is read.
    """
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    files = safetensors_files(folder)
    shapes = hf_tensor_shapes(files)
    cfg = model_config_from_hf(hf_config, has_mtp_weights=any(k.startswith("model.mtp.") for k in shapes))
    layout = detect_layout(set(shapes), cfg=cfg)
    expected, optional = expected_hf_shapes(cfg, layout=layout, packed_experts=packed_rows(shapes, cfg=cfg))
    check_tensor_shapes(shapes, expected=expected, optional=optional, source=f"Hugging Face folder {folder}",
                        hint="Check that config.json belongs to these weights")

    hf_sd: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            hf_sd.update({name: f.get_tensor(name) for name in f.keys()})
    ours = from_hf_state_dict(hf_sd, cfg=cfg)
    del hf_sd
    if cfg.tie_word_embeddings:
        ours["lm_head.weight"] = ours["model.embed_tokens.weight"]
    meta = meta_state_dict(cfg)
    assert ours.keys() == meta.keys(), sorted(set(ours) ^ set(meta))
    # fp32 master weights; a copy per key, so no two entries (tied, or views of one file) share storage.
    return cfg, {k: ours[k].to(torch.float32, copy=True).contiguous() for k in meta}, layout


def import_hf(hf_dir: Path, *, output: Path, force: bool = False) -> ImportResult:
    """Write a longcat checkpoint folder ``output`` from the HF folder ``hf_dir`` (module docstring).

    Args:
        hf_dir: a folder with config.json and safetensors weights.
        output: the checkpoint folder to create (written beside it, then renamed into place).
        force: replace a non-empty ``output``.

    Raises:
        ValueError: as ``load_hf_checkpoint``, or ``output`` is not empty (without ``force``).
    """
    hf_dir, output = Path(hf_dir), Path(output)
    check_output_free(output, force=force)
    cfg, state_dict, layout = load_hf_checkpoint(hf_dir)
    with atomic_output_dir(output, force=force) as tmp:
        with single_process_dcp():
            dcp.save({"model": state_dict}, checkpoint_id=str(tmp))
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        trainer_state = {"step": 0, "tokens_seen": 0.0, "config": {"model": asdict(cfg)},
                         "imported_from": str(hf_dir.resolve())}
        torch.save(trainer_state, tmp / TRAINER_STATE)  # last, as CheckpointManager does
    logger.info("imported %s (%s layout) -> %s (%d tensors)", hf_dir, layout.value, output, len(state_dict))
    return ImportResult(output=output, config=cfg, layout=layout, num_tensors=len(state_dict))
