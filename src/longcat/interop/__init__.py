"""Hugging Face interop: export a checkpoint as a LongCat-Flash model folder, import one back.

``export_hf`` (``tools/export_hf.py``) and ``import_hf`` (``tools/import_hf.py``); the tensor and
config mapping itself lives in ``longcat.model.hf_mapping``.
"""

from longcat.interop.export_hf import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportDtype,
    ExportResult,
    SpecialTokenIds,
    check_tensor_shapes,
    export_hf,
    hf_config_json,
    parse_size,
    resolve_checkpoint,
)
from longcat.interop.import_hf import ImportResult, expected_hf_shapes, import_hf, load_hf_checkpoint

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ExportDtype",
    "ExportResult",
    "ImportResult",
    "SpecialTokenIds",
    "check_tensor_shapes",
    "expected_hf_shapes",
    "export_hf",
    "hf_config_json",
    "import_hf",
    "load_hf_checkpoint",
    "parse_size",
    "resolve_checkpoint",
]
