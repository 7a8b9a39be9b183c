"""The optimiser recipe both tasks share: the warmup-cosine learning-rate schedule, AdamW parameter groups (no weight
decay on biases, norms and tokens; layer-wise lr decay for fine-tuning), and where a resumed run stands.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..methods import MIMMethod
from ..parts.classifier import Classifier


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup from 0, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step (torch's ``fused=True``) when every parameter is on a GPU — Lightning
    moves the model to its device before it asks for the optimizer — and torch's default implementation elsewhere."""
    parameters = [parameter for group in groups for parameter in group["params"]]
    fused = bool(parameters) and all(p.is_cuda and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


def adamw_warmup_cosine(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], warmup_fraction: float,
                        total_steps: int, min_lr: float) -> dict[str, Any]:
    """:func:`adamw` with a per-step warmup-cosine schedule, as Lightning's ``configure_optimizers`` returns it."""
    optimizer = adamw(groups, lr, betas)
    warmup = int(warmup_fraction * total_steps)
    min_ratio = min_lr / lr if lr > 0 else 0.0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda step: warmup_cosine(step, warmup, total_steps, min_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def parameter_groups(method: MIMMethod, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (1-D or token params)."""
    decay, no_decay = [], []
    for name, parameter in method.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or "token" in name or "pos_embed" in name or "relative" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resume_position(global_step: int, batches_per_epoch: int, accumulate: int) -> tuple[int, int]:
    """(epoch, batches of it already trained) after ``global_step`` optimizer steps; (epoch, 0) at a boundary.

    Derived from the step count alone (checkpoints are only written after an optimizer step), with Lightning's
    convention that an epoch ends with a step even when its batches are not a multiple of ``accumulate``.
    """
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accumulate))
    epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    return epoch, steps_into_epoch * accumulate


def layer_decay_groups(classifier: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with an ``lr_scale`` each: layer 0 = embeddings (patch_embed, cls_token, …), layer i = block i,
    layer N + 1 = the encoder's final norm (when kept), fc_norm and head; scale = layer_decay^(N + 1 − layer).
    No weight decay on 1-D parameters, tokens and position tables (the rule of ``engine.parameter_groups``)."""
    depth = len(classifier.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in classifier.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder.") and not name.startswith("encoder.norm."):
            layer = 0
        else:
            layer = depth + 1
        decay = not (parameter.ndim <= 1 or "token" in name or "pos_embed" in name or "relative" in name)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]
