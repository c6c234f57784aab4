"""Our state dict <-> Hugging Face LongCat-Flash state dicts and config.

Every non-expert key is shared verbatim (``model.embed_tokens``, ``model.layers.{L}.self_attn.{0,1}.*``,
``mlps``, norms, ``mlp.router.*``, ``model.norm``, ``lm_head``). The experts differ by layout:

    ours                         [N, I, D] gate_proj, [N, I, D] up_proj, [N, D, I] down_proj
    HFLayout.PACKED              transformers in-memory: gate_up_proj [P, 2I, D] (gate rows, then up
                                 rows), down_proj [N, D, I]. P is what the installed transformers packs:
                                 N in 5.25 (routed experts only), N+Z in 5.0 (rows >= N zero and unused);
                                 ``longcat.interop.transformers_compat`` asks transformers which.
    HFLayout.PER_EXPERT          released checkpoint: mlp.experts.{i}.{gate,up,down}_proj.weight, i < N; also
                                 what transformers 5.25 ``save_pretrained`` writes and ``from_pretrained`` reads
    HFLayout.PER_EXPERT_PADDED   what transformers 5.0 saved and needed: PER_EXPERT plus all-zero
                                 gate_proj/up_proj [I, D] for i = N..N+Z-1 (read by the import; written only
                                 when the installed transformers asks for it)

The MTP head (``model.mtp.*``) maps onto the released names (``model.mtp.layers.0.*``; the release
also stores a copy of the embedding as ``model.mtp.embed_tokens.weight``). transformers ignores
``model.mtp.*`` when loading.

Shape legend:
    N  n_routed_experts     Z  zero_expert_num     D  hidden_size     I  expert_ffn_hidden_size
"""

from __future__ import annotations

import dataclasses
import enum
import re

import torch

from longcat.config.schema import ModelConfig
from longcat.model.model import LongcatFlashForCausalLM


class HFLayout(str, enum.Enum):
    PACKED = "packed"  # transformers' LongcatFlashExperts parameters
    PER_EXPERT = "per_expert"  # the released safetensors (and transformers 5.25's save_pretrained)
    PER_EXPERT_PADDED = "per_expert_padded"  # transformers 5.0's save_pretrained / from_pretrained


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


# config.json fields transformers fills in when absent (LongcatFlashConfig defaults, v5).
_HF_DEFAULTS = dict(
    zero_expert_num=256, routed_scaling_factor=6.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
    initializer_range=0.02, attention_bias=False, tie_word_embeddings=False, rope_theta=10000000.0,
)
_HF_ALIASES = {  # ours -> other spellings (LongcatFlashConfig.attribute_map)
    "n_routed_experts": ("num_local_experts",),
    "moe_topk": ("num_experts_per_tok",),
    "ffn_hidden_size": ("intermediate_size",),
    "expert_ffn_hidden_size": ("moe_intermediate_size",),
}


def model_config_from_hf(hf_config: dict, *, has_mtp_weights: bool = False) -> ModelConfig:
    """A ``config.json`` dict -> ``ModelConfig``: the inverse of ``hf_config_dict``.

    Fields absent from the file take transformers' ``LongcatFlashConfig`` defaults, as
    ``from_pretrained`` would (``rope_theta`` 1e7, ``zero_expert_num`` 256, ...), except the dimensions,
    which are required. ``mtp_num_layers`` absent: 1 when ``has_mtp_weights`` (``model.mtp.*`` tensors
    present), else 0.

    Raises:
        ValueError: ``model_type`` is not ``longcat_flash``; a dimension is missing; or the file asks
            for something this model does not implement (grouped KV heads, RoPE scaling, a router bias,
            an activation other than silu, non-identity zero experts, MLA scaling off, head_dim !=
            qk_rope_head_dim). The message names the field.
    """
    if hf_config.get("model_type") != "longcat_flash":
        raise ValueError(
            f"config.json has model_type={hf_config.get('model_type')!r}; only 'longcat_flash' "
            "(LongCat-Flash) checkpoints can be imported"
        )

    def get(name: str):
        for key in (name, *_HF_ALIASES.get(name, ())):
            if hf_config.get(key) is not None:
                return hf_config[key]
        if name == "num_layers" and hf_config.get("num_hidden_layers") is not None:
            return hf_config["num_hidden_layers"] // 2  # transformers counts each ScMoE layer twice
        if name in _HF_DEFAULTS:
            return _HF_DEFAULTS[name]
        if name in hf_config:  # an explicit null (e.g. q_lora_rank): ModelConfig.validate names it
            return None
        raise ValueError(f"config.json lacks {name!r}; add it (see hf_config_dict for every field)")

    rope = hf_config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf_config.get("rope_scaling"):
        raise ValueError(
            f"config.json asks for RoPE scaling (rope_parameters={rope}, rope_scaling="
            f"{hf_config.get('rope_scaling')}); only rope_type 'default' is implemented"
        )
    # Fields with a config.json counterpart; any other ModelConfig field keeps its default.
    mapped = hf_config_dict(ModelConfig()).keys() - {"mtp_num_layers"}
    dims = {f.name: get(f.name) for f in dataclasses.fields(ModelConfig) if f.name in mapped}
    cfg = ModelConfig(
        **dims,
        rope_theta=float(rope.get("rope_theta") or get("rope_theta")),
        mtp_num_layers=int(hf_config.get("mtp_num_layers", 1 if has_mtp_weights else 0)),
    )
    unsupported = {
        "num_key_value_heads": (hf_config.get("num_key_value_heads"), (None, cfg.num_attention_heads)),
        "hidden_act": (hf_config.get("hidden_act"), (None, "silu")),
        "router_bias": (hf_config.get("router_bias"), (None, False)),
        "zero_expert_type": (hf_config.get("zero_expert_type"), (None, "identity")),
        "mla_scale_q_lora": (hf_config.get("mla_scale_q_lora"), (None, True)),
        "mla_scale_kv_lora": (hf_config.get("mla_scale_kv_lora"), (None, True)),
        "head_dim": (hf_config.get("head_dim"), (None, cfg.qk_rope_head_dim)),
        "qk_head_dim": (hf_config.get("qk_head_dim"), (None, cfg.qk_head_dim)),
    }
    for name, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(
                f"config.json has {name}={value!r}; this model implements only {allowed[1]!r} (or the field absent)"
            )
    cfg.validate()
    return cfg


def meta_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our model's state dict on the meta device: every parameter and buffer name, shape and dtype."""
    with torch.device("meta"):
        return LongcatFlashForCausalLM(cfg).state_dict()


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    cfg: ModelConfig,
    layout: HFLayout = HFLayout.PACKED,
    include_mtp: bool = True,
    packed_experts: int | None = None,
) -> dict[str, torch.Tensor]:
    """Our ``state_dict()`` -> an HF state dict in ``layout`` (new tensors for experts, others shared).

    Works on meta tensors too (the expected names and shapes of a layout). A tied ``lm_head.weight``
    is kept (transformers accepts it; file writers may drop it).

    Args:
        packed_experts: PACKED only: rows P of ``gate_up_proj`` (N <= P; rows >= N are zero). None: N.
            ``longcat.interop.to_transformers_state_dict`` passes what the installed transformers packs.

    Raises:
        ValueError: a stacked expert projection is missing, an MTP parameter is unknown, or
            ``packed_experts`` < N.
    """
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
        out.update(_experts_to_hf(prefix, mats, num_zero_experts=cfg.zero_expert_num, layout=layout,
                                  packed_experts=packed_experts))
    if include_mtp and any(k.startswith("model.mtp.") for k in state_dict):
        out["model.mtp.embed_tokens.weight"] = state_dict["model.embed_tokens.weight"]
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], *, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF state dict (any ``HFLayout``) -> our key names and stacked experts.

    Only experts 0..N-1 are kept: zero-expert rows (PACKED of transformers 5.0, PER_EXPERT_PADDED) are unused.
    Names are not validated here (see ``longcat.interop.check_hf_tensors``).

    Raises:
        ValueError: a per-expert projection is missing for some expert i < N.
    """
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


def _experts_to_hf(
    prefix: str, mats: dict[str, torch.Tensor], *, num_zero_experts: int, layout: HFLayout, packed_experts: int | None
) -> dict:
    gate_NID, up_NID, down_NDI = mats["gate_proj"], mats["up_proj"], mats["down_proj"]
    N, I, D = gate_NID.shape
    if layout in (HFLayout.PER_EXPERT, HFLayout.PER_EXPERT_PADDED):
        out = {}
        for i in range(N):
            out[f"{prefix}.{i}.gate_proj.weight"] = gate_NID[i]
            out[f"{prefix}.{i}.up_proj.weight"] = up_NID[i]
            out[f"{prefix}.{i}.down_proj.weight"] = down_NDI[i]
        if layout == HFLayout.PER_EXPERT_PADDED:
            for i in range(N, N + num_zero_experts):
                out[f"{prefix}.{i}.gate_proj.weight"] = gate_NID.new_zeros(I, D)
                out[f"{prefix}.{i}.up_proj.weight"] = gate_NID.new_zeros(I, D)
        return out
    P = N if packed_experts is None else packed_experts
    if P < N:
        raise ValueError(f"{prefix}: packed_experts={P} < n_routed_experts={N}")
    gate_up = gate_NID.new_zeros(P, 2 * I, D)
    gate_up[:N, :I] = gate_NID
    gate_up[:N, I:] = up_NID
    return {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down_NDI}


def _rename_mtp(suffix: str, *, to_released: bool) -> str:
    for ours, released in _MTP_RENAMES:
        src, dst = (ours, released) if to_released else (released, ours)
        if suffix.startswith(src):
            return ("model.mtp." if to_released else "") + dst + suffix[len(src):]
    raise ValueError(f"unknown MTP parameter model.mtp.{suffix}")
