"""The LongCat-Flash model (arXiv 2509.01322 §2), numerically equal to HF ``LongcatFlashForCausalLM``."""

from longcat.model.attention import MultiHeadLatentAttention
from longcat.model.init import ParamGroup, init_weights, param_group, param_groups_names
from longcat.model.layer import DecoderLayer
from longcat.model.mlp import SwiGLU
from longcat.model.model import (
    BackboneOutput,
    LongcatFlashForCausalLM,
    LongcatFlashModel,
    ModelOutput,
)
from longcat.model.moe import (
    GroupedExperts,
    LocalTokenDispatcher,
    MoE,
    MoEStats,
    RouterOutput,
    TokenDispatcher,
    TopKRouter,
)
from longcat.model.mtp import MTPHead
from longcat.model.norm import RMSNorm
from longcat.model.params import ParamCount, count_parameters
from longcat.model.rope import RotaryEmbedding, apply_interleaved_rope

__all__ = [
    "BackboneOutput",
    "DecoderLayer",
    "GroupedExperts",
    "LocalTokenDispatcher",
    "LongcatFlashForCausalLM",
    "LongcatFlashModel",
    "MTPHead",
    "MoE",
    "MoEStats",
    "ModelOutput",
    "MultiHeadLatentAttention",
    "ParamCount",
    "ParamGroup",
    "RMSNorm",
    "RotaryEmbedding",
    "RouterOutput",
    "SwiGLU",
    "TokenDispatcher",
    "TopKRouter",
    "apply_interleaved_rope",
    "count_parameters",
    "init_weights",
    "param_group",
    "param_groups_names",
]
