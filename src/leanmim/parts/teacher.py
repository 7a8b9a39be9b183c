"""Exponential-moving-average (EMA) teachers, shared by the methods that distill (PCAE, DDAE)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """An exact, gradient-free copy of ``student``, in eval mode semantics for dropout-free ViTs."""
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def cosine_momentum(progress: float, start: float, end: float) -> float:
    """Cosine schedule from ``start`` (progress 0) to ``end`` (progress 1).

    The EMA update after optimizer step k of K (k from 0) takes ``progress = k / K``, the progress that step's
    forward saw (``MIMMethod.after_optimizer_step``): m_k = end − (end − start)·(cos(π·k/K) + 1)/2, the
    released PCAE schedule (``cosine_scheduler(momentum_teacher, 1, …)[k]``, DINO's). So the first update uses
    ``start`` and the last one, k = K − 1, still moves the teacher a little; ``end`` itself is never used.
    """
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← momentum · teacher + (1 − momentum) · student, parameter by parameter."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
