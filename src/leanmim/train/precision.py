"""Which precision and device a run gets: ``--precision auto`` is bf16 where the hardware computes it (a GPU, a CPU with
AVX512-BF16 or AMX) and fp32 elsewhere, where bf16 would be emulated and slow.
"""

from __future__ import annotations

import torch

from ..config import RunConfig


def bf16_supported(accelerator: str = "auto") -> bool:
    """bf16 autocast pays off on CUDA with bf16 support and on CPUs with native bf16 (AVX512-BF16/AMX)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def lightning_precision(config: RunConfig) -> str:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if bf16_supported(config.train.accelerator) else "32"
    return "bf16-mixed" if precision == "bf16" else "32-true"


def precision_reason(requested: str, resolved: str, accelerator: str = "auto") -> str:
    """``"fp32: this CPU has no native bf16 (--precision bf16 forces it)"`` and the like."""
    import torch

    name = "bf16 mixed" if resolved.startswith("bf16") else "fp32"
    if requested != "auto":
        return f"{name}: --precision {requested}"
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    where = f"this GPU ({torch.cuda.get_device_name()})" if on_gpu else "this CPU"
    if name == "fp32":
        return f"fp32: {where} has no native bf16 (--precision bf16 forces it)"
    return f"bf16 mixed: {where} has native bf16 (--precision 32 for fp32)"


def default_device() -> torch.device:
    """The GPU when torch sees one, else the CPU (probe, reconstruct; pretrain and finetune: Lightning's 'auto')."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pin_memory(trainer) -> bool:
    """Page-locked loader batches when training on a GPU: Lightning then copies them to it asynchronously
    (``non_blocking``), overlapping the copy with the previous step. Pointless (and a little slower) on a CPU."""
    return trainer is not None and getattr(trainer.strategy.root_device, "type", "cpu") == "cuda"
