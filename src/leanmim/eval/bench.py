"""Methods side by side on this machine: counted MACs, measured training speed and peak memory, relative to MAE.

For every method (MAE always included, first, as the reference):

- ``forward_macs``, ``train_macs``: MACs per image of a training forward pass and of a whole training step
  (forward + backward), counted by :func:`leanmim.eval.cost.method_cost`;
- ``img_per_s``: training images per second, ``batch_size`` / the median time of ``steps`` timed steps
  (forward + backward + AdamW update + the method's ``after_optimizer_step``, as the engine runs them) after
  ``warmup_steps`` untimed ones, on one fixed batch. All methods live in one process and are stepped
  round-robin (A, B, C, A, B, C, …) so machine drift and other load hit them alike;
- ``peak_mem_bytes``: :func:`leanmim.eval.cost.peak_train_memory`: the peak bytes torch allocates during one
  training step (activations, temporaries, gradients; not parameters or optimizer states);

and each as a ratio to MAE's. Data loading and augmentation are not included (the same for every method).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import ConfigError, ModelConfig, format_img_size
from ..methods import METHODS, MIMMethod, build_method, method_class
from ..parts.encoder import training_attention
from ..parts.tokens import BatchRandom
from ..train.optim import adamw, parameter_groups
from ..train.precision import bf16_supported
from .cost import method_cost, peak_train_memory

REFERENCE = "mae"
RATIO_KEYS = ("train_macs", "img_per_s", "peak_mem_bytes")


def resolve_methods(methods: Sequence[str] | None) -> list[str]:
    """MAE first, then the requested methods (default: every registered one) in the order given, no repeats."""
    names = list(methods) if methods else sorted(METHODS)
    for name in names:
        method_class(name)  # ConfigError for an unknown name
    return list(dict.fromkeys([REFERENCE, *names]))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or auto, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(device)


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for 'bf16', and for 'auto' where the hardware runs bf16 natively; None (fp32) otherwise."""
    if precision not in ("auto", "bf16", "32"):
        raise ConfigError(f"precision must be auto, bf16 or 32, got '{precision}'")
    if precision == "auto":
        precision = "bf16" if bf16_supported("gpu" if device.type == "cuda" else "cpu") else "32"
    return torch.bfloat16 if precision == "bf16" else None


class Stepper:
    """One method with its AdamW optimizer, stepping on a fixed batch as the engine does."""

    def __init__(self, method: MIMMethod, images: torch.Tensor, autocast_dtype: torch.dtype | None):
        self.method, self.images, self.autocast_dtype = method.train(), images, autocast_dtype
        self.optimizer = adamw(parameter_groups(method, 0.05), 1e-4, (0.9, 0.95))  # the engine's (fused on a GPU)
        self.steps_done = 0

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        device = self.images.device
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None), \
                training_attention(self.method, device):
            loss = self.method(self.images, rng=BatchRandom(0, self.steps_done)).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step(0.0)
        synchronize()
        self.steps_done += 1
        return time.perf_counter() - start


def machine_info(device: torch.device, autocast_dtype: torch.dtype | None) -> dict[str, Any]:
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device.type,
            "precision": "bf16-mixed" if autocast_dtype is torch.bfloat16 else "32-true"}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench(methods: Sequence[str] | None, model: ModelConfig, steps: int = 10, batch_size: int = 32,
          precision: str = "auto", warmup_steps: int = 2, options: dict[str, dict[str, Any]] | None = None,
          device: str = "auto") -> dict[str, Any]:
    """Measure ``methods`` on ``model`` (resolved); see the module docstring. ``options``: per-method options."""
    if steps < 1 or batch_size < 1 or warmup_steps < 0:
        raise ConfigError("bench: steps and batch_size must be at least 1, warmup_steps at least 0")
    names = resolve_methods(methods)
    options = options or {}
    unknown = set(options) - set(names)
    if unknown:
        raise ConfigError(f"options given for method(s) {', '.join(sorted(unknown))} that are not benchmarked")
    target = resolve_device(device)
    autocast_dtype = autocast_dtype_for(precision, target)

    results: dict[str, dict[str, Any]] = {}
    steppers: dict[str, Stepper] = {}
    for name in names:
        cost = method_cost(name, model, options.get(name))
        torch.manual_seed(0)
        method = build_method(name, model, options.get(name, {})).to(target)
        images = torch.randn(batch_size, model.in_chans, *model.img_hw,
                             generator=torch.Generator().manual_seed(0)).to(target)
        results[name] = {"forward_macs": cost["macs"]["total"], "train_macs": cost["macs"]["train_step"],
                         "params": cost["params"]["trainable"],
                         "peak_mem_bytes": peak_train_memory(method.train(), images, autocast_dtype)}
        steppers[name] = Stepper(method, images, autocast_dtype)

    for _ in range(warmup_steps):
        for stepper in steppers.values():
            stepper.step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(steps):
        for name, stepper in steppers.items():
            times[name].append(stepper.step())

    for name in names:
        results[name]["img_per_s"] = batch_size / statistics.median(times[name])
        results[name]["step_seconds"] = times[name]
    reference = results[REFERENCE]
    for name in names:
        results[name]["ratio_to_mae"] = {key: results[name][key] / reference[key] for key in RATIO_KEYS}
    return {"methods": results,
            "machine": machine_info(target, autocast_dtype),
            "setup": {"model": model.name, "img_size": model.img_size, "patch_size": model.patch_size,
                      "in_chans": model.in_chans, "embed_dim": model.embed_dim, "depth": model.depth,
                      "decoder_embed_dim": model.decoder_embed_dim, "decoder_depth": model.decoder_depth,
                      "batch_size": batch_size, "steps": steps, "warmup_steps": warmup_steps,
                      "options": options}}


def format_bench_table(result: dict[str, Any]) -> str:
    """The terminal table: absolute figures and (× MAE) ratios."""
    header = ("method", "fwd GMACs", "train GMACs", "× MAE", "img/s", "× MAE", "peak MiB", "× MAE")
    rows = [header]
    for name, entry in result["methods"].items():
        ratio = entry["ratio_to_mae"]
        rows.append((name, f"{entry['forward_macs'] / 1e9:.3f}", f"{entry['train_macs'] / 1e9:.3f}",
                     f"{ratio['train_macs']:.2f}", f"{entry['img_per_s']:.1f}", f"{ratio['img_per_s']:.2f}",
                     f"{entry['peak_mem_bytes'] / 2**20:.1f}", f"{ratio['peak_mem_bytes']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    machine, setup = result["machine"], result["setup"]
    lines.append(f"{setup['model']} @ {format_img_size(setup['img_size'])} px, patch {setup['patch_size']}, batch {setup['batch_size']},"
                 f" median of {setup['steps']} steps; {machine['precision']} on {machine.get('gpu', machine['cpu'])}, "
                 f"{machine['threads']} threads, torch {machine['torch']}")
    return "\n".join(lines)


def save_bench_plot(result: dict[str, Any], out: str | Path) -> Path:
    """Three bar charts (training GMACs per image, images/s, peak memory), each bar labelled with its ratio to MAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    panels = [("train_macs", "training GMACs / image (counted)", 1e-9),
              ("img_per_s", "training images / s (measured)", 1.0),
              ("peak_mem_bytes", "peak training memory, MiB", 2.0 ** -20)]
    figure, axes = plt.subplots(1, 3, figsize=(4 * len(panels) + 1, 3.6))
    for axis, (key, title, scale) in zip(axes, panels):
        values = [result["methods"][name][key] * scale for name in names]
        bars = axis.bar(names, values, color=["#777777" if name == REFERENCE else "#3a78b5" for name in names])
        for bar, name in zip(bars, names):
            axis.annotate(f"×{result['methods'][name]['ratio_to_mae'][key]:.2f}",
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", rotation=30)
        axis.margins(y=0.15)
    setup, machine = result["setup"], result["machine"]
    figure.suptitle(f"{setup['model']} @ {format_img_size(setup['img_size'])} px / patch {setup['patch_size']}, batch "
                    f"{setup['batch_size']}, {machine['precision']}, {machine.get('gpu', machine['cpu'])}", fontsize=9)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
