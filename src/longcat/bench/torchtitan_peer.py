"""torchtitan's DeepSeek-V3 (MLA + grouped-GEMM MoE) as a second peer, found through an environment
variable and skipped cleanly when absent.

``LONGCAT_TORCHTITAN_PATH`` lists (``os.pathsep``-separated) the folders to put on ``sys.path``: a
torchtitan source tree (tested: v0.2.2) and, if needed, a folder holding its pure-Python import-time
dependencies (``pip install --target DIR tyro``). Nothing of torchtitan is vendored here.

Two CPU adaptations, made at load time without editing torchtitan's files:

- ``torchtitan.models.moe.kernels`` imports Triton at module level for a CUDA-only kernel; when
  Triton is missing, the module is executed from its own source with inert ``triton.jit`` and
  ``tl.constexpr`` stand-ins, and ``generate_permute_indices`` takes its CPU path (``use_cpu``) for
  CPU tensors. No ``triton`` module is registered, so PyTorch's own Triton detection is untouched.
- DeepSeek-V3's package ``__init__`` (trainer hooks: data loaders, tokenizer) is not run; its
  ``model`` subpackage is imported on its own, and ``protocols.train_spec`` (data sets, validation) is
  replaced by the one name the model takes from it, ``ModelProtocol`` (from ``protocols.model``).
- the router counts tokens per expert with ``torch.histc`` on int64 ids, which PyTorch implements for
  floating-point input only on CPU; the MoE module sees a ``torch`` whose ``histc`` counts integer ids
  in float and returns the input's dtype (the same counts).

Matched dimensions and FLOPs (``build_deepseek_v3``): one LongCat-Flash layer holds 2 MLA blocks,
2 dense FFNs of width F and 1 MoE; the DeepSeek-V3 model gets 2L layers, the first L dense with a
single FFN of width 2F (the same FLOPs as two of width F), the last L with an MoE of N experts of the
same width choosing top-k_e (LongCat's average FFN experts per token, so the expert FLOPs match), no
shared expert, softmax scores, no YaRN (``original_seq_len`` >= the sequence). torchtitan's
``use_grouped_mm=True`` computes the experts in bf16 on every device (it casts x and the weights);
``use_grouped_mm=False`` is its fp32 per-expert loop.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, cast

import torch

from longcat.config.schema import ModelConfig

ENV_VAR = "LONGCAT_TORCHTITAN_PATH"


@dataclass(frozen=True)
class TorchTitan:
    """The loaded peer: its MoE module (``torchtitan.models.moe.moe``), the DeepSeek-V3 model and args
    classes, where it came from and its version (``assets/version.txt`` and ``git describe`` when the
    tree is a checkout)."""

    moe: Any
    model_cls: Any
    args_cls: Any
    root: str
    version: str


class _TorchWithIntHistc(types.ModuleType):
    """``torch`` for torchtitan's MoE module: ``histc`` also takes integer input (see the module doc)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def histc(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if input.is_floating_point():
            return torch.histc(input, *args, **kwargs)
        return torch.histc(input.float(), *args, **kwargs).to(input.dtype)


def _cpu_kernels_module(root: Path) -> types.ModuleType:
    """``torchtitan.models.moe.kernels`` executed without Triton (module doc)."""
    path = root / "models" / "moe" / "kernels.py"
    source = path.read_text().replace("import triton.language as tl\n", "").replace("import triton\n", "")
    module = types.ModuleType("torchtitan.models.moe.kernels")
    module.__file__ = str(path)
    module.__dict__.update(triton=types.SimpleNamespace(jit=lambda fn: fn), tl=types.SimpleNamespace(constexpr=int))
    exec(compile(source, str(path), "exec"), module.__dict__)
    generate = module.__dict__["generate_permute_indices"]

    def generate_permute_indices(tokens_per_expert_group: torch.Tensor, *args: Any, **kwargs: Any):
        kwargs.setdefault("use_cpu", tokens_per_expert_group.device.type == "cpu")
        return generate(tokens_per_expert_group, *args, **kwargs)

    module.__dict__["generate_permute_indices"] = generate_permute_indices
    return module


def _bare_package(name: str, folder: Path) -> None:
    """Register package ``name`` without running its ``__init__`` (DeepSeek-V3's imports the trainer's
    data loaders and their dependencies; the benchmark needs only the model)."""
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package


def _version(root: Path) -> str:
    tree = root.parent
    parts = []
    version_file = tree / "assets" / "version.txt"
    if version_file.is_file():
        parts.append(version_file.read_text().strip())
    try:
        described = subprocess.run(["git", "-C", str(tree), "describe", "--tags", "--always"], capture_output=True,
                                   text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    if described:
        parts.append(f"git {described}")
    return " / ".join(parts) or "unknown"


def load_torchtitan(path: Optional[str] = None) -> tuple[Optional[TorchTitan], str]:
    """(the peer, "") or (None, why it is skipped). ``path`` defaults to ``$LONGCAT_TORCHTITAN_PATH``."""
    path = os.environ.get(ENV_VAR, "") if path is None else path
    folders = [p for p in path.split(os.pathsep) if p]
    if not folders:
        return None, f"torchtitan not configured: set {ENV_VAR} to a torchtitan source tree (v0.2.2)"
    for folder in reversed(folders):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    spec = importlib.util.find_spec("torchtitan")
    if spec is None or spec.origin is None:
        return None, f"no torchtitan package under {ENV_VAR}={path!r}"
    root = Path(spec.origin).parent
    try:
        if importlib.util.find_spec("triton") is None:
            sys.modules.setdefault("torchtitan.models.moe.kernels", _cpu_kernels_module(root))
        _bare_package("torchtitan.models.deepseek_v3", root / "models" / "deepseek_v3")
        if "torchtitan.protocols.train_spec" not in sys.modules:
            # model.py takes only ModelProtocol from train_spec, whose other imports are the trainer's
            # (data sets, validation); the class itself lives in protocols.model.
            train_spec = types.ModuleType("torchtitan.protocols.train_spec")
            protocol = importlib.import_module("torchtitan.protocols.model").__dict__["ModelProtocol"]
            train_spec.__dict__["ModelProtocol"] = protocol
            sys.modules[train_spec.__name__] = train_spec
        moe = importlib.import_module("torchtitan.models.moe.moe")
        model_mod = importlib.import_module("torchtitan.models.deepseek_v3.model.model")
        args_mod = importlib.import_module("torchtitan.models.deepseek_v3.model.args")
    except Exception as exc:  # an incompatible tree or a missing dependency: skip, saying which
        return None, f"torchtitan at {root} failed to import: {type(exc).__name__}: {exc}"
    moe.__dict__["torch"] = _TorchWithIntHistc("torch")
    return TorchTitan(moe=moe, model_cls=model_mod.DeepSeekV3Model, args_cls=args_mod.DeepSeekV3ModelArgs,
                      root=str(root), version=_version(root)), ""


def _moe_args(tt: TorchTitan, cfg: ModelConfig, *, top_k: int, grouped_mm: bool) -> Any:
    return tt.moe.MoEArgs(num_experts=cfg.n_routed_experts, num_shared_experts=0, score_func="softmax",
                          route_norm=False, route_scale=cfg.routed_scaling_factor, top_k=top_k,
                          use_grouped_mm=grouped_mm, load_balance_coeff=1e-3, score_before_experts=False)


def build_moe(tt: TorchTitan, cfg: ModelConfig, *, top_k: int, grouped_mm: bool, seed: int = 0) -> torch.nn.Module:
    """torchtitan's MoE block with LongCat's N FFN experts of width ``expert_ffn_hidden_size``, top-``top_k``."""
    torch.manual_seed(seed)
    block = tt.moe.MoE(_moe_args(tt, cfg, top_k=top_k, grouped_mm=grouped_mm), dim=cfg.hidden_size,
                       hidden_dim=cfg.expert_ffn_hidden_size)
    with torch.no_grad():  # torchtitan's trainer initialises under no_grad
        block.init_weights(0.02, torch.device("cpu"))
    return block.train()


def build_deepseek_v3(tt: TorchTitan, cfg: ModelConfig, *, top_k: int, grouped_mm: bool, seq_len: int,
                      seed: int = 0) -> torch.nn.Module:
    """DeepSeek-V3 at LongCat's dimensions and FLOPs (module doc), initialised by torchtitan, train mode."""
    args = tt.args_cls(
        max_batch_size=64, max_seq_len=max(seq_len, 16), vocab_size=cfg.vocab_size, dim=cfg.hidden_size,
        inter_dim=2 * cfg.ffn_hidden_size, moe_inter_dim=cfg.expert_ffn_hidden_size, n_layers=2 * cfg.num_layers,
        n_dense_layers=cfg.num_layers, n_heads=cfg.num_attention_heads, norm_eps=cfg.rms_norm_eps,
        moe_args=_moe_args(tt, cfg, top_k=top_k, grouped_mm=grouped_mm), q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, attn_type="sdpa", attn_mask_type="causal", original_seq_len=max(seq_len, 16),
        rope_theta=cfg.rope_theta)
    if not hasattr(args, "moe_impl"):  # set by the trainer's config hook in v0.2.2
        args.moe_impl = "standard"
    torch.manual_seed(seed)
    model = tt.model_cls(args)
    with torch.no_grad():
        model.init_weights(torch.device("cpu"))
    return model.train()


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` each transformer block of a torchtitan model in place, as torchtitan's
    ``apply_compile`` does (without ``fullgraph``: on CPU its MoE's token-index fill calls ``.item()``,
    a graph break). Returns the model; the first call compiles."""
    layers = cast(torch.nn.Module, model.layers)
    for name, block in list(layers.named_children()):
        layers.register_module(name, cast(torch.nn.Module, torch.compile(block)))
    return model
