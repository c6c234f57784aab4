"""Model growth: initialise a deep model by stacking a shallower trained one (arXiv 2509.01322 §3.1.2).

A checkpoint with L layers becomes one with r x L layers: target layer ``k*L + i`` is a copy of source
layer ``i`` (the whole stack repeated r times, in order). Everything else (embedding, final norm, LM
head, MTP head, expert biases) is copied unchanged, and the training state is kept: step and token
counters, LR schedule, data position and the bias controller.

Optimizer state (documented choice): AdamW moments and step counts are stacked exactly like the
parameters, so the grown run continues with the moments the source layers had — the paper keeps
"the training state"; a fresh optimizer is available with ``keep_optimizer=False``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import torch

from longcat.config.schema import run_config_from_dict
from longcat.model import LongcatFlashForCausalLM
from longcat.train.checkpoint import TRAINER_STATE, CheckpointManager, latest_checkpoint
from longcat.train.optim import build_optimizer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def source_name(target_name: str, *, source_layers: int) -> str:
    """The source parameter a grown model's parameter is copied from."""
    match = _LAYER.match(target_name)
    if not match:
        return target_name
    return f"model.layers.{int(match.group(1)) % source_layers}.{match.group(2)}"


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a checkpoint folder, else the latest complete one under it."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise ValueError(f"{path} holds no complete longcat checkpoint (looked in {path} and {path / 'checkpoints'})")


def grow_checkpoint(source: Path, output_root: Path, *, factor: int, keep_optimizer: bool = True) -> Path:
    """Write a checkpoint with ``factor`` x the source's layers under ``output_root``; returns its folder.

    ``output_root`` becomes a run's ``checkpoints/`` folder: a run with ``train.out_dir`` = its parent and
    ``train.resume=auto`` continues from it.

    Raises:
        ValueError: factor < 2, or ``source`` is not a complete checkpoint.
    """
    if factor < 2:
        raise ValueError(f"factor={factor}: growth stacks the model at least twice (factor >= 2)")
    source = resolve_checkpoint(source)
    state = torch.load(source / TRAINER_STATE, weights_only=False)
    src_cfg = run_config_from_dict(state["config"])
    src_model = LongcatFlashForCausalLM(src_cfg.model)
    src_optim = build_optimizer(src_model, optim_cfg=src_cfg.optim, model_cfg=src_cfg.model)
    CheckpointManager(source.parent).load(source, model=src_model, optimizer=src_optim)

    tgt_cfg = copy.deepcopy(src_cfg)
    tgt_cfg.model = dataclasses.replace(src_cfg.model, num_layers=src_cfg.model.num_layers * factor)
    tgt_model = LongcatFlashForCausalLM(tgt_cfg.model)
    tgt_optim = build_optimizer(tgt_model, optim_cfg=tgt_cfg.optim, model_cfg=tgt_cfg.model)

    src_params = dict(src_model.named_parameters())
    src_state = src_model.state_dict()
    with torch.no_grad():
        for name, tensor in tgt_model.state_dict().items():
            tensor.copy_(src_state[source_name(name, source_layers=src_cfg.model.num_layers)])
    if keep_optimizer:
        for name, param in tgt_model.named_parameters():
            moments = src_optim.state.get(src_params[source_name(name, source_layers=src_cfg.model.num_layers)])
            if moments:
                tgt_optim.state[param] = {k: v.clone() for k, v in moments.items()}

    new_state = dict(state)
    new_state["config"] = copy.deepcopy(state["config"])
    new_state["config"]["model"]["num_layers"] = tgt_cfg.model.num_layers
    new_state["grown_from"] = {"checkpoint": str(source), "factor": factor}
    if not keep_optimizer:
        new_state.pop("scheduler", None)
    return CheckpointManager(Path(output_root), keep_last=1_000_000).save(
        state["step"], model=tgt_model, optimizer=tgt_optim, trainer_state=new_state)
