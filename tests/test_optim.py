"""The optimiser recipe both tasks share (train/optim.py): schedule values by hand, AdamW's groups and kernel choice."""

from __future__ import annotations

import math

import pytest
import torch

from leanmim.train.optim import adamw, adamw_warmup_cosine, warmup_cosine
from leanmim.train.precision import pin_memory


def test_warmup_cosine_by_hand():
    # 4 warmup steps of 10: 1/4, 2/4, 3/4, 4/4, then cosine from 1 to min_ratio over the remaining 6
    assert [warmup_cosine(s, 4, 10, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(7, 4, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert warmup_cosine(10, 4, 10, 0.1) == pytest.approx(0.1) and warmup_cosine(50, 4, 10, 0.1) == pytest.approx(0.1)


def test_adamw_is_fused_only_on_a_gpu_and_the_schedule_steps_per_optimizer_step():
    layer = torch.nn.Linear(3, 2)
    groups = [{"params": [layer.weight], "weight_decay": 0.05}, {"params": [layer.bias], "weight_decay": 0.0}]
    assert not adamw(groups, 1e-3, (0.9, 0.95)).defaults.get("fused")  # CPU parameters: torch's default kernel
    configured = adamw_warmup_cosine(groups, 1e-3, (0.9, 0.95), warmup_fraction=0.5, total_steps=4, min_lr=1e-5)
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0] and optimizer.defaults["betas"] == (0.9, 0.95)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([1e-3 * warmup_cosine(s, 2, 4, 1e-2) for s in range(4)])
    assert not pin_memory(None)
