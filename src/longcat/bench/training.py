"""One full training step (forward, loss, backward, AdamW step) of our model and of the reference.

The reference is transformers' ``LongcatFlashForCausalLM`` (SDPA attention, ``use_cache=False``)
loaded with our weights through ``interop.to_transformers_state_dict``, so both start from the same point.
Both steps use the same objective, mean next-token cross-entropy (``losses.cross_entropy_sum`` over
the B x S labels), and AdamW with the same per-group rules (``optim.group_rules``, groups by
``init.param_group`` of each parameter's name): the trainer's z-loss, load-balance loss and gradient
clipping are left out because the reference has no counterpart.

Shape legend:
    B  batch (micro-batch size)
    S  sequence length
    V  vocab_size
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from longcat.config.schema import LMHeadCE, ModelConfig, OptimConfig
from longcat.model import LongcatFlashForCausalLM
from longcat.model.init import param_group
from longcat.train import losses
from longcat.train.optim import build_optimizer, group_rules, width_scale

# The benchmark's AdamW: conf/optim/adamw.yaml but a small LR. Without the load-balance loss and the
# expert-bias controller the routing drifts, and with it the expert work being timed: on `small`,
# lr=3e-3 took k_e from 2.9 to ~1 FFN experts per token in ~10 steps, lr=1e-4 from 2.7 to 3.4 in 12.
BENCH_OPTIM = OptimConfig(lr=1e-4, betas=(0.9, 0.95), eps=1e-16, weight_decay=0.1)


@dataclass
class Batch:
    """input_ids_BS / labels_BS: int64 [B, S]; labels are the inputs shifted by one token."""

    input_ids_BS: torch.Tensor
    labels_BS: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids_BS.numel()


def make_batch(cfg: ModelConfig, *, batch_size: int, seq_len: int, seed: int = 0) -> Batch:
    """Uniformly random tokens (fixed by ``seed``): routing is then roughly balanced, like a trained
    router's. Raises ValueError on non-positive sizes."""
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return Batch(input_ids_BS=ids[:, :-1].contiguous(), labels_BS=ids[:, 1:].contiguous())


@dataclass
class StepOutput:
    """loss: the step's objective before the update. ffn_experts_per_token: measured average FFN
    (non-zero) experts per token per MoE layer (None for the reference, which reports no statistics)."""

    loss: float
    ffn_experts_per_token: Optional[float]


def build_ours(cfg: ModelConfig, *, seed: int = 0, activation_checkpointing: bool = False) -> LongcatFlashForCausalLM:
    """Our model, initialised from ``seed``, in train mode."""
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(cfg, activation_checkpointing=activation_checkpointing)
    return model.train()


def build_reference(cfg: ModelConfig, *, state_dict: dict[str, torch.Tensor], activation_checkpointing: bool = False):
    """transformers' ``LongcatFlashForCausalLM`` holding ``state_dict`` (ours), fp32, train mode.

    Raises:
        ValueError: transformers is missing or lacks LongcatFlash, or ``cfg`` has an MTP head (the
            reference does not train one, so the steps would differ).
    """
    try:
        from transformers import LongcatFlashConfig
        from transformers import LongcatFlashForCausalLM as HFLongcat
    except ImportError as exc:
        raise ValueError(
            f"the reference needs transformers>=5 with LongcatFlash ({exc}); pip install -e '.[test]'") from None
    # Only the reference needs these (with the optional transformers): a child measuring our own
    # step does not load them (bench/child.py counts every import in its baseline RSS).
    from longcat.interop import to_transformers_state_dict
    from longcat.model.hf_mapping import hf_config_dict

    if cfg.mtp_num_layers:
        raise ValueError("benchmark against the reference with model.mtp_num_layers=0 (it trains no MTP head)")
    hf_cfg = LongcatFlashConfig(**hf_config_dict(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.use_cache = False
    model = HFLongcat(hf_cfg)
    model.load_state_dict(to_transformers_state_dict(state_dict, cfg=cfg), strict=True)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def reference_optimizer(model: torch.nn.Module, *, optim_cfg: OptimConfig, model_cfg: ModelConfig) -> torch.optim.AdamW:
    """AdamW over the reference's parameters with ``build_optimizer``'s per-kind LR and weight decay
    (kinds from the parameter names, which the reference shares with our checkpoint layout)."""
    rules = group_rules(optim_cfg, scale=width_scale(model_cfg, optim_cfg))
    grouped: dict[str, list[torch.nn.Parameter]] = {k: [] for k in rules}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grouped[param_group(name, param).value].append(param)
    groups = [{"params": p, "lr": rules[k].lr, "weight_decay": rules[k].weight_decay} for k, p in grouped.items() if p]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


def _autocast(dtype: Optional[torch.dtype], *, device: torch.device):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class OursStep:
    """A full training step of our model on a fixed batch; call it to run one step.

    Args:
        model: ``LongcatFlashForCausalLM`` (any device; the batch is moved there once).
        batch: the micro-batch, reused every step.
        optimizer: defaults to ``build_optimizer`` with ``BENCH_OPTIM``.
        autocast_dtype: None/fp32 = plain fp32; torch.bfloat16 = autocast (fp32 master weights).
        lm_head_ce: the head's loss as training takes it (``loss.lm_head_ce``): fused with the head's GEMM
            (the default), or from the logits.
    """

    def __init__(self, model: LongcatFlashForCausalLM, *, batch: Batch,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 autocast_dtype: Optional[torch.dtype] = None, lm_head_ce: LMHeadCE = LMHeadCE.fused) -> None:
        self.model = model
        self.cfg = model.cfg
        self.fused_head = LMHeadCE(lm_head_ce) is LMHeadCE.fused
        device = next(model.parameters()).device
        self.input_ids_BS = batch.input_ids_BS.to(device)
        self.labels_BS = batch.labels_BS.to(device)
        self.optimizer = optimizer or build_optimizer(model, optim_cfg=BENCH_OPTIM, model_cfg=model.cfg)
        self.autocast_dtype = autocast_dtype

    def __call__(self) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.autocast_dtype, device=self.input_ids_BS.device):
            out = self.model(self.input_ids_BS, **({"labels_BS": self.labels_BS} if self.fused_head else {}))
        ce_sum = out.ce_sum if self.fused_head else losses.cross_entropy_sum(out.logits_BSV, self.labels_BS)
        assert ce_sum is not None  # the model returns it when given labels
        loss = ce_sum / self.labels_BS.numel()
        loss.backward()
        self.optimizer.step()
        N = self.cfg.n_routed_experts
        with torch.no_grad():
            per_layer = [s.expert_counts_E[:N].sum() / s.num_tokens.clamp(min=1) for s in out.moe_stats]
            k_e = float(torch.stack(per_layer).mean()) if per_layer else 0.0
        return StepOutput(loss=float(loss.detach()), ffn_experts_per_token=k_e)


class ReferenceStep:
    """A full training step of the reference model; same batch, objective and optimizer rules."""

    def __init__(self, model: Any, *, batch: Batch, model_cfg: ModelConfig,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        self.model = model
        device = next(model.parameters()).device
        self.input_ids_BS = batch.input_ids_BS.to(device)
        self.labels_BS = batch.labels_BS.to(device)
        self.optimizer = optimizer or reference_optimizer(model, optim_cfg=BENCH_OPTIM, model_cfg=model_cfg)
        self.autocast_dtype = autocast_dtype

    def __call__(self) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.autocast_dtype, device=self.input_ids_BS.device):
            logits_BSV = self.model(input_ids=self.input_ids_BS, use_cache=False).logits
        loss = losses.cross_entropy_sum(logits_BSV, self.labels_BS) / self.labels_BS.numel()
        loss.backward()
        self.optimizer.step()
        return StepOutput(loss=float(loss.detach()), ffn_experts_per_token=None)


def build_pair(cfg: ModelConfig, *, batch: Batch, seed: int = 0) -> tuple[OursStep, ReferenceStep]:
    """Our step and the reference step on the same weights, batch, objective and optimizer rules."""
    ours = build_ours(cfg, seed=seed)
    reference = build_reference(cfg, state_dict=ours.state_dict())
    return OursStep(ours, batch=batch), ReferenceStep(reference, batch=batch, model_cfg=cfg)
