"""Export a longcat checkpoint as a Hugging Face LongCat-Flash model folder.

The folder ``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM / SGLang) read:

    config.json                      model_type longcat_flash, every dimension, special-token ids
    generation_config.json           bos / eos / pad ids
    model-0000i-of-0000n.safetensors tensors under the released names (``hf_mapping``), at most
    model.safetensors.index.json       ``max_shard_bytes`` per file (a larger tensor gets its own file)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (when a tokenizer is known)

The checkpoint is read with ``torch.distributed.checkpoint`` in one process, without a process group:
DCP stores every tensor globally under its global name, whatever layout saved it, so each tensor is
read whole. Reading is streamed one decoder layer at a time (then the embedding, final norm, LM head
and MTP head), so peak memory is about one layer plus one shard, not the model.

The router (``mlp.router.classifier.weight``, ``mlp.router.e_score_correction_bias``) stays fp32 in
every export dtype: routing runs in fp32 and a bf16 expert bias would round away the small updates of
the budget controller (arXiv 2509.01322 §2.1.1).

Shape legend: see ``longcat.model.hf_mapping``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Collection, Iterator, Mapping, Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from longcat.config.schema import ModelConfig
from longcat.data.corpus import stdlib_cache_dir
from longcat.data.tokenizer import EOD_TOKEN, PAD_TOKEN, load_tokenizer
from longcat.interop.transformers_compat import transformers_layout
from longcat.model.hf_mapping import (
    HFLayout,
    hf_config_dict,
    meta_state_dict,
    to_hf_state_dict,
)
from longcat.train.checkpoint import TRAINER_STATE, latest_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers' save_pretrained
INDEX_FILE = "model.safetensors.index.json"
MODEL_KEY_PREFIX = "model."  # CheckpointManager saves {"model": model_sd, "optim": ...}
_FP32_TENSORS = re.compile(r"\.mlp\.router\.(classifier\.weight|e_score_correction_bias)$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DCP_NO_PG_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class ExportLayout(str, enum.Enum):
    """transformers: what the installed transformers' ``save_pretrained`` writes (asked of it, see
    ``transformers_compat.transformers_layout``); released: exactly the released tensor set (vLLM, SGLang)."""

    transformers = "transformers"
    released = "released"


class ExportDtype(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self is ExportDtype.fp32 else torch.bfloat16

    @property
    def config_name(self) -> str:
        """The ``dtype`` string of a transformers ``config.json``."""
        return "float32" if self is ExportDtype.fp32 else "bfloat16"


@dataclass(frozen=True)
class SpecialTokenIds:
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


@dataclass(frozen=True)
class ExportResult:
    """output: the written folder; checkpoint: the step folder read; shards: safetensors file names;
    num_tensors / total_bytes: over all shards; tokenizer: the tokenizer.json copied (None: none)."""

    output: Path
    checkpoint: Path
    shards: list[str]
    num_tensors: int
    total_bytes: int
    tokenizer: Optional[Path]


# ------------------------------------------------------------------------------------------ helpers


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"500MiB"`` -> 500 * 2**20, ``"123"`` -> 123 bytes (transformers' units).

    Raises:
        ValueError: for an unparsable or non-positive size.
    """
    match = _SIZE_RE.match(str(text))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse size {text!r}; write e.g. 5GB, 500MB, 2GiB or a byte count")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def check_output_free(output: Path, *, force: bool) -> None:
    """Raises ValueError when ``output`` exists and is not an empty folder, unless ``force``."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise ValueError(f"{output} exists and is not empty; pass --force to replace it, or choose another output")


@contextlib.contextmanager
def atomic_output_dir(output: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``output``; on success it is renamed to ``output`` (a
    rename is atomic), so ``output`` is never seen half-written. On error the temporary folder is
    removed and ``output`` is untouched.

    Raises:
        ValueError: ``output`` exists and is not an empty folder, and ``force`` is False.
    """
    output = Path(output)
    check_output_free(output, force=force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def check_tensor_shapes(
    found: Mapping[str, tuple[int, ...]],
    *,
    expected: Mapping[str, tuple[int, ...]],
    optional: Collection[str] = (),
    source: str,
    hint: str,
) -> None:
    """Compare tensor names and shapes with what a config implies.

    Args:
        found: name -> shape in the file being read.
        expected: name -> shape the config implies.
        optional: expected names that may be absent.
        source: what is being read (for the message).
        hint: how to fix a mismatch (appended to the message).

    Raises:
        ValueError: naming every unknown, missing and wrongly shaped tensor (expected vs found shape).
    """
    unknown = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found) - set(optional))
    wrong = [f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
             for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    problems = [f"{what} ({len(items)}): " + ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")
                for what, items in (("unknown tensors", unknown), ("missing tensors", missing),
                                    ("wrong shapes", wrong)) if items]
    if problems:
        raise ValueError(f"{source} does not match its config: " + "; ".join(problems) + f". {hint}")


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """Silence DCP's warning that no process group exists: reading or writing whole tensors in one
    process is what we mean to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_NO_PG_WARNING)
        yield


# --------------------------------------------------------------------------------- checkpoint side


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder (``step_XXXXXXXX``) as given, or the latest complete one under a run's
    ``checkpoints/`` folder (or under ``<run>/checkpoints``).

    Raises:
        ValueError: no complete checkpoint is found there.
    """
    path = Path(path)
    if (path / TRAINER_STATE).is_file() and (path / ".metadata").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise ValueError(
        f"{path} is neither a complete longcat checkpoint (a step_XXXXXXXX folder with {TRAINER_STATE} and "
        ".metadata) nor a checkpoints/ folder holding one; pass e.g. runs/pretrain/checkpoints"
    )


def read_trainer_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / TRAINER_STATE, weights_only=False)


def model_config_from_run_config(run_config: dict, *, source: str) -> ModelConfig:
    """The ``model`` sub-dict of a checkpoint's saved run config -> a validated ``ModelConfig``.

    Raises:
        ValueError: the config has no ``model`` dict, or its values are invalid.
    """
    model = run_config.get("model") if isinstance(run_config, dict) else None
    if not isinstance(model, dict) or not model:
        raise ValueError(f"{source} has no config['model'] dict; it was not written by longcat's trainer")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        logger.warning("%s: ignoring model config fields this version does not know: %s", source, unknown)
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in known})
    cfg.validate()
    return cfg


def checkpoint_model_tensors(checkpoint: Path) -> dict[str, TensorStorageMetadata]:
    """Our parameter names -> DCP storage metadata (global size, dtype) of the model in ``checkpoint``."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    return {key[len(MODEL_KEY_PREFIX):]: meta for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(MODEL_KEY_PREFIX) and isinstance(meta, TensorStorageMetadata)}


def load_checkpoint_tensors(
    checkpoint: Path, keys: list[str], *, metadata: Mapping[str, TensorStorageMetadata]
) -> dict[str, torch.Tensor]:
    """Read the full (global) tensors ``keys`` (our names) from a DCP checkpoint on the CPU, in their
    stored dtype, single-process (no process group needed)."""
    tensors = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in keys}
    with single_process_dcp():
        dcp.load({"model": tensors}, checkpoint_id=str(checkpoint))
    return tensors


def _load_units(cfg: ModelConfig, keys: list[str]) -> list[list[str]]:
    """Our keys in read units: one per decoder layer, then the rest (embedding, norm, head, MTP head;
    together because the released MTP layout repeats the embedding)."""
    layers: list[list[str]] = [[] for _ in range(cfg.num_layers)]
    rest: list[str] = []
    for key in keys:
        match = re.match(r"^model\.layers\.(\d+)\.", key)
        (layers[int(match.group(1))] if match else rest).append(key)
    return [unit for unit in (*layers, rest) if unit]


# ---------------------------------------------------------------------------------- HF folder side


def hf_config_json(cfg: ModelConfig, *, dtype: ExportDtype, token_ids: Optional[SpecialTokenIds]) -> dict:
    """The ``config.json`` of an export: ``hf_config_dict`` plus the fields the release and vLLM read
    (``zero_expert_type``, MLA scaling flags, ``router_bias``), ``rope_theta`` also at the top level
    (transformers < 5 reads it there), and the special-token ids (None without a tokenizer)."""
    ids = asdict(token_ids) if token_ids else dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return dict(
        architectures=["LongcatFlashForCausalLM"],
        model_type="longcat_flash",
        **hf_config_dict(cfg),
        qk_head_dim=cfg.qk_head_dim,
        rope_theta=cfg.rope_theta,
        zero_expert_type="identity",
        mla_scale_q_lora=True,
        mla_scale_kv_lora=True,
        router_bias=False,
        **ids,
        dtype=dtype.config_name,
        use_cache=True,
    )


def default_tokenizer(run_config: dict) -> Optional[Path]:
    """The tokenizer.json a run trained with, if it can be found from here: ``data.tokenizer``, else the
    embedded stdlib corpus's cached tokenizer (``data.cache_dir``, relative to the working directory)."""
    data = run_config.get("data") or {}
    model = run_config.get("model") or {}
    if data.get("tokenizer"):
        return Path(data["tokenizer"])
    if data.get("corpus", "stdlib") == "stdlib" and "vocab_size" in model:
        cache = stdlib_cache_dir(data.get("cache_dir", ".cache/longcat"), vocab_size=model["vocab_size"],
                                 max_bytes=data.get("corpus_max_bytes", 0))
        candidate = Path(cache) / "tokenizer.json"
        if candidate.is_file():
            return candidate
    return None


def check_tokenizer(tokenizer: Path, *, vocab_size: int) -> SpecialTokenIds:
    """Special-token ids of ``tokenizer`` (GPT-2 style: bos = eos = ``<|endoftext|>``; pad ``<|pad|>``).

    Raises:
        ValueError: the file is missing or malformed, lacks the special tokens, or has more ids than
            the model's vocab_size.
    """
    tok = load_tokenizer(str(tokenizer))
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer} has {tok.vocab_size} ids but the model's vocab_size is {vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    return SpecialTokenIds(bos_token_id=tok.eod_id, eos_token_id=tok.eod_id, pad_token_id=tok.pad_id)


def write_tokenizer_files(tokenizer: Path, folder: Path, *, max_length: int) -> None:
    """Copy ``tokenizer.json`` and write a ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, eos
    ``<|endoftext|>``, pad ``<|pad|>``, no BOS/EOS added on encode) that ``AutoTokenizer`` loads."""
    shutil.copyfile(tokenizer, folder / "tokenizer.json")
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN}
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    })
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


class _ShardWriter:
    """Buffers tensors and writes a safetensors file whenever the next tensor would overflow
    ``max_shard_bytes``; ``finish`` names the files ``model-0000i-of-0000n.safetensors`` and writes
    the index."""

    def __init__(self, folder: Path, *, max_shard_bytes: int) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # tensor names per written file
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(self.pending, str(self.folder / f"shard-{len(self.files):05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        umask = os.umask(0)
        os.umask(umask)
        for i, (name, tensors) in enumerate(zip(names, self.files)):
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / name)
            os.chmod(self.folder / name, 0o666 & ~umask)  # safetensors creates files 0600
            weight_map.update({t: name for t in tensors})
        _write_json(self.folder / INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return names


# ----------------------------------------------------------------------------------------- export


def resolve_export_layout(layout: ExportLayout | HFLayout | str, *, cfg: ModelConfig) -> HFLayout:
    """The per-expert ``HFLayout`` an export of ``cfg`` writes for ``layout`` (``transformers``: asked of
    the installed transformers).

    Raises:
        ValueError: an unknown or PACKED layout; for ``transformers``, as ``transformers_layout``.
    """
    if layout in (ExportLayout.transformers, ExportLayout.transformers.value):
        return transformers_layout(cfg).file_layout
    if layout in (ExportLayout.released, ExportLayout.released.value):
        return HFLayout.PER_EXPERT
    try:
        resolved = HFLayout(layout)
    except ValueError:
        raise ValueError(f"unknown export layout {layout!r}; choose transformers or released") from None
    if resolved == HFLayout.PACKED:
        raise ValueError("layout=packed is transformers' in-memory layout; export transformers or released")
    return resolved


def export_hf(
    checkpoint: Path,
    *,
    output: Path,
    dtype: ExportDtype = ExportDtype.fp32,
    layout: ExportLayout | HFLayout = ExportLayout.transformers,
    tokenizer: Optional[Path] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
) -> ExportResult:
    """Write a Hugging Face LongCat-Flash folder from a longcat checkpoint (see the module docstring).

    Args:
        checkpoint: a ``step_XXXXXXXX`` folder, or a run's ``checkpoints/`` (the latest complete one).
        output: the folder to create (written beside it, then renamed into place).
        dtype: tensor dtype in the files; the router stays fp32 whatever this is.
        layout: ``ExportLayout.transformers`` (default: the per-expert files the installed transformers
            writes and loads; 5.25: exactly the released tensors), ``ExportLayout.released`` (exactly the
            released tensors: vLLM, SGLang; needs no transformers), or an ``HFLayout`` per-expert layout.
        tokenizer: tokenizer.json to include; None: the run's own if it can be found (else none, and the
            config's special-token ids stay null).
        max_shard_bytes: largest safetensors file (a single larger tensor gets a file of its own).
        force: replace a non-empty ``output``.

    Raises:
        ValueError: before anything is written, when ``output`` is not empty (without ``force``), no
            checkpoint is found, the checkpoint's tensors disagree with its config (naming each unknown,
            missing or wrongly shaped tensor), the tokenizer is unusable, ``layout`` is PACKED, or
            ``layout`` is transformers and transformers is missing or has a layout we do not write
            (``TransformersLayoutError``, naming the transformers version and the tensor).
    """
    if layout == HFLayout.PACKED:
        raise ValueError("layout=packed is transformers' in-memory layout; export transformers or released")
    dtype = ExportDtype(dtype)
    output = Path(output)
    check_output_free(output, force=force)
    ckpt = resolve_checkpoint(checkpoint)
    run_config = read_trainer_state(ckpt).get("config", {})
    cfg = model_config_from_run_config(run_config, source=str(ckpt / TRAINER_STATE))
    stored = checkpoint_model_tensors(ckpt)
    expected = meta_state_dict(cfg)
    check_tensor_shapes({k: tuple(m.size) for k, m in stored.items()},
                        expected={k: tuple(t.shape) for k, t in expected.items()},
                        source=f"checkpoint {ckpt}",
                        hint=f"Its {TRAINER_STATE} config must describe the saved model")
    layout = resolve_export_layout(layout, cfg=cfg)
    tokenizer = Path(tokenizer) if tokenizer else default_tokenizer(run_config)
    token_ids = check_tokenizer(tokenizer, vocab_size=cfg.vocab_size) if tokenizer else None
    if tokenizer is None:
        logger.warning("no tokenizer given or found for %s; exporting without tokenizer files (pass --tokenizer)",
                       ckpt)

    with atomic_output_dir(output, force=force) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes=max_shard_bytes)
        for unit in _load_units(cfg, list(expected)):
            hf_unit = to_hf_state_dict(load_checkpoint_tensors(ckpt, unit, metadata=stored), cfg=cfg, layout=layout)
            for name, tensor in hf_unit.items():
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied to model.embed_tokens.weight, as transformers saves it
                target = torch.float32 if _FP32_TENSORS.search(name) else dtype.torch_dtype
                writer.add(name, tensor.to(target, copy=True).contiguous())
            del hf_unit
        shards = writer.finish()
        _write_json(tmp / "config.json", hf_config_json(cfg, dtype=dtype, token_ids=token_ids))
        generation = asdict(token_ids) if token_ids else {}
        if token_ids is not None:
            assert tokenizer is not None  # token_ids were read from it
            write_tokenizer_files(tokenizer, tmp, max_length=cfg.max_position_embeddings)
        _write_json(tmp / "generation_config.json", generation)
        num_tensors = sum(len(f) for f in writer.files)
    logger.info("exported %s -> %s (%d tensors, %d shard(s), %.1f MB)", ckpt, output, num_tensors, len(shards),
                writer.total_bytes / 1e6)
    return ExportResult(output=output, checkpoint=ckpt, shards=shards, num_tensors=num_tensors,
                        total_bytes=writer.total_bytes, tokenizer=tokenizer)
