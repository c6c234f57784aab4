"""LongCat-Flash's parallel plans, on the model-agnostic pieces of ``longcat.distributed``.

    tensor_parallel   which layers become column/row/vocab-parallel (TP, SP)
    expert_parallel   experts sharded over ep, the all-to-all dispatcher, the ScMoE overlap switch
    pipeline          stages of whole decoder layers for the generic ``PipelineRunner``
    parallelize       all of it in a fixed order (TP -> EP -> PP -> DP) -> ``ParallelModel``
"""

from longcat.model.parallel.expert_parallel import (
    ExpertShard,
    apply_expert_parallel,
    apply_moe_overlap,
    expert_param_global_info,
    expert_shard_to_dtensor,
)
from longcat.model.parallel.parallelize import (
    ParallelModel,
    ParamPlacement,
    check_layout,
    parallelize,
)
from longcat.model.parallel.pipeline import (
    PipelineStageModule,
    StageObjective,
    build_pipeline,
)
from longcat.model.parallel.tensor_parallel import (
    apply_tensor_parallel,
    check_tensor_parallel,
    tp_param_global_info,
)

__all__ = [
    "ExpertShard",
    "ParallelModel",
    "ParamPlacement",
    "PipelineStageModule",
    "StageObjective",
    "apply_expert_parallel",
    "apply_moe_overlap",
    "apply_tensor_parallel",
    "build_pipeline",
    "check_layout",
    "check_tensor_parallel",
    "expert_param_global_info",
    "expert_shard_to_dtensor",
    "parallelize",
    "tp_param_global_info",
]
