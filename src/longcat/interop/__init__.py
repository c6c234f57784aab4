"""Hugging Face interop: export a checkpoint as a LongCat-Flash model folder, import one back.

``export_hf`` (``tools/export_hf.py``) and ``import_hf`` (``tools/import_hf.py``); the tensor and
config mapping itself lives in ``longcat.model.hf_mapping``.
"""

from longcat.interop.export_hf import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportDtype,
    ExportLayout,
    ExportResult,
    SpecialTokenIds,
    check_tensor_shapes,
    export_hf,
    hf_config_json,
    parse_size,
    resolve_checkpoint,
    resolve_export_layout,
)
from longcat.interop.import_hf import (
    ImportResult,
    expected_hf_shapes,
    import_hf,
    load_hf_checkpoint,
)
from longcat.interop.transformers_compat import (
    TransformersLayout,
    TransformersLayoutError,
    to_transformers_state_dict,
    transformers_layout,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ExportDtype",
    "ExportLayout",
    "ExportResult",
    "ImportResult",
    "SpecialTokenIds",
    "TransformersLayout",
    "TransformersLayoutError",
    "check_tensor_shapes",
    "expected_hf_shapes",
    "export_hf",
    "hf_config_json",
    "import_hf",
    "load_hf_checkpoint",
    "parse_size",
    "resolve_checkpoint",
    "resolve_export_layout",
    "to_transformers_state_dict",
    "transformers_layout",
]
