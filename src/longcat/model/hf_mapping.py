"""Our state dict <-> Hugging Face LongCat-Flash state dicts and config.

Every non-expert key is shared verbatim (``model.embed_tokens``, ``model.layers.{L}.self_attn.{0,1}.*``,
``mlps``, norms, ``mlp.router.*``, ``model.norm``, ``lm_head``). The experts differ by layout:

    ours                         [N, I, D] gate_proj, [N, I, D] up_proj, [N, D, I] down_proj
    HFLayout.PACKED              transformers in-memory: gate_up_proj [N+Z, 2I, D] (gate rows, then up
                                 rows; rows >= N are zero and unused), down_proj [N, D, I]
    HFLayout.PER_EXPERT          released checkpoint: mlp.experts.{i}.{gate,up,down}_proj.weight

The MTP head (``model.mtp.*``) maps onto the released names (``model.mtp.layers.0.*``; the release
also stores a copy of the embedding as ``model.mtp.embed_tokens.weight``). transformers ignores
``model.mtp.*`` when loading.

Shape legend:
    N  n_routed_experts     Z  zero_expert_num     D  hidden_size     I  expert_ffn_hidden_size
"""

from __future__ import annotations

import enum
import re

import torch

from longcat.config.schema import ModelConfig


class HFLayout(str, enum.Enum):
    PACKED = "packed"  # transformers' LongcatFlashExperts parameters
    PER_EXPERT = "per_expert"  # the released safetensors


_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_MTP_RENAMES = [  # (ours, released), prefix match after "model.mtp."
    ("enorm.weight", "layers.0.enorm.m.weight"),
    ("hnorm.weight", "layers.0.hnorm.m.weight"),
    ("eh_proj.", "layers.0.eh_proj."),
    ("input_layernorm.", "layers.0.input_layernorm."),
    ("post_attention_layernorm.", "layers.0.post_attention_layernorm."),
    ("self_attn.", "layers.0.self_attn."),
    ("mlp.", "layers.0.transformer_layer.mlp."),
    ("norm.weight", "norm.weight"),
]


def hf_config_dict(cfg: ModelConfig) -> dict:
    """Keyword arguments for ``transformers.LongcatFlashConfig`` (also the ``config.json`` fields).

    ``head_dim`` is the rope dim: transformers sizes its rotary table from it."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        n_routed_experts=cfg.n_routed_experts,
        zero_expert_num=cfg.zero_expert_num,
        moe_topk=cfg.moe_topk,
        expert_ffn_hidden_size=cfg.expert_ffn_hidden_size,
        routed_scaling_factor=cfg.routed_scaling_factor,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        attention_bias=cfg.attention_bias,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        mtp_num_layers=cfg.mtp_num_layers,
    )


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    cfg: ModelConfig,
    layout: HFLayout = HFLayout.PACKED,
    include_mtp: bool = True,
) -> dict[str, torch.Tensor]:
    """Our ``state_dict()`` -> an HF state dict in ``layout`` (new tensors for experts, others shared)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if match := _EXPERT_KEY.match(key):
            experts.setdefault(match.group(1), {})[match.group(2)] = value
        elif key.startswith("model.mtp."):
            if include_mtp:
                out[_rename_mtp(key[len("model.mtp."):], to_released=True)] = value
        else:
            out[key] = value
    for prefix, mats in experts.items():
        if set(mats) != {"gate_proj", "up_proj", "down_proj"}:
            raise ValueError(f"{prefix}: expected gate_proj, up_proj, down_proj; got {sorted(mats)}")
        out.update(_experts_to_hf(prefix, mats, num_zero_experts=cfg.zero_expert_num, layout=layout))
    if include_mtp and any(k.startswith("model.mtp.") for k in state_dict):
        out["model.mtp.embed_tokens.weight"] = state_dict["model.embed_tokens.weight"]
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], *, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF state dict (either layout) -> our key names and stacked experts."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    per_expert_re = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    N, I = cfg.n_routed_experts, cfg.expert_ffn_hidden_size
    for key, value in hf_state_dict.items():
        if match := per_expert_re.match(key):
            per_expert.setdefault(match.group(1), {})[(match.group(3), int(match.group(2)))] = value
        elif key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            out[f"{prefix}.gate_proj"] = value[:N, :I].clone()
            out[f"{prefix}.up_proj"] = value[:N, I:].clone()
        elif key.endswith(".mlp.experts.down_proj"):
            out[key] = value[:N]
        elif key == "model.mtp.embed_tokens.weight":
            continue  # a copy of model.embed_tokens.weight
        elif key.startswith("model.mtp."):
            out["model.mtp." + _rename_mtp(key[len("model.mtp."):], to_released=False)] = value
        else:
            out[key] = value
    for prefix, mats in per_expert.items():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            missing = [i for i in range(N) if (proj, i) not in mats]
            if missing:
                raise ValueError(f"{prefix}: {proj} missing for experts {missing[:8]}")
            out[f"{prefix}.{proj}"] = torch.stack([mats[(proj, i)] for i in range(N)])
    return out


def _experts_to_hf(prefix: str, mats: dict[str, torch.Tensor], *, num_zero_experts: int, layout: HFLayout) -> dict:
    gate_NID, up_NID, down_NDI = mats["gate_proj"], mats["up_proj"], mats["down_proj"]
    N, I, D = gate_NID.shape
    if layout == HFLayout.PER_EXPERT:
        out = {}
        for i in range(N):
            out[f"{prefix}.{i}.gate_proj.weight"] = gate_NID[i]
            out[f"{prefix}.{i}.up_proj.weight"] = up_NID[i]
            out[f"{prefix}.{i}.down_proj.weight"] = down_NDI[i]
        return out
    gate_up = gate_NID.new_zeros(N + num_zero_experts, 2 * I, D)
    gate_up[:N, :I] = gate_NID
    gate_up[:N, I:] = up_NID
    return {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down_NDI}


def _rename_mtp(suffix: str, *, to_released: bool) -> str:
    for ours, released in _MTP_RENAMES:
        src, dst = (ours, released) if to_released else (released, ours)
        if suffix.startswith(src):
            return ("model.mtp." if to_released else "") + dst + suffix[len(src):]
    raise ValueError(f"unknown MTP parameter model.mtp.{suffix}")
