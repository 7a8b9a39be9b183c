"""Which attention kernel a CPU training step should run: torch's fused flash kernel, the SDPA math kernel,
or timm's explicit path (q·kᵀ, softmax, ·v as plain matmuls) — side by side in one run.

A step is forward + backward + AdamW update. For every case the kernels are interleaved (A, B, C, A, B, C, …)
so machine drift hits them alike; the median step is reported, with each kernel's time relative to the one
leanmim chooses (``encoder.training_attention``), so "flash / chosen = 1.4" means the choice is 1.4× faster.

    python benchmarks/attention_kernels.py                      # every case, bf16 and fp32 rows
    python benchmarks/attention_kernels.py --only demo-finetune --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from leanmim.eval.bench import cpu_model
from leanmim.config import ModelConfig
from leanmim.parts.encoder import attention_modules, training_attention
from leanmim.parts.classifier import Classifier, prepare_encoder
from leanmim.methods import build_method

DEMO = dict(name="vit_tiny_patch16", img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=8, num_heads=3,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)     # configs/demo.yaml's model
VIT_B = dict(name="vit_base_patch16", img_size=224, in_chans=3)
# name: (model, what is trained, batch)
CASES = {
    "demo-mae": (DEMO, "mae", 256),
    "demo-prmim": (DEMO, "prmim", 256),
    "demo-finetune": (DEMO, "finetune", 256),     # the demo encoder + flattened-token head (--pool tokens)
    "vitb224-mae": (VIT_B, "mae", 16),
}
KERNELS = ("flash", "math", "explicit", "chosen")


def kernel_context(kernel: str, model: torch.nn.Module):
    """The context a forward runs in for ``kernel`` ('chosen': leanmim's own choice)."""
    if kernel == "chosen":
        return training_attention(model, "cpu")
    if kernel == "math":
        return sdpa_kernel(SDPBackend.MATH)
    if kernel == "flash":
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


class Stepper:
    """A model + AdamW stepping on a fixed batch; ``step(kernel)`` returns the step's wall time in seconds."""

    def __init__(self, model_spec: dict, trained: str, batch: int, bf16: bool):
        torch.manual_seed(0)
        config = ModelConfig(**model_spec).resolved()
        self.num_tokens = config.num_patches + 1
        self.images = torch.randn(batch, config.in_chans, config.img_size, config.img_size)
        if trained == "finetune":
            encoder = prepare_encoder(build_method("mae", config, {}).encoder, 0.0, "tokens")
            self.model = Classifier(encoder, num_classes=10, pool="tokens")
            labels = torch.arange(batch) % 10
            self.loss = lambda: F.cross_entropy(self.model(self.images).float(), labels, label_smoothing=0.1)
        else:
            self.model = build_method(trained, config, {})
            self.loss = lambda: self.model(self.images).loss
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.bf16 = bf16

    def step(self, kernel: str) -> float:
        for module in attention_modules(self.model):
            module.fused_attn = kernel != "explicit"
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16), \
                kernel_context(kernel, self.model):
            loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        for module in attention_modules(self.model):
            module.fused_attn = True
        return elapsed


def measure(name: str, precision: str, steps: int) -> dict:
    model_spec, trained, batch = CASES[name]
    stepper = Stepper(model_spec, trained, batch, bf16=precision == "bf16")
    for kernel in KERNELS:          # warm-up: allocation, first-call dispatch
        stepper.step(kernel)
    times = {kernel: [] for kernel in KERNELS}
    for _ in range(steps):
        for kernel in KERNELS:
            times[kernel].append(stepper.step(kernel))
    median = {kernel: statistics.median(values) for kernel, values in times.items()}
    return {"case": name, "precision": precision, "batch": batch, "tokens": stepper.num_tokens,
            "step_s": median, "over_chosen": {kernel: median[kernel] / median["chosen"] for kernel in KERNELS}}


def table(rows: list[dict]) -> str:
    lines = ["| case | precision | batch | grid + cls tokens | flash s | math s | explicit s | chosen s | "
             "flash / chosen | math / chosen |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        step, ratio = row["step_s"], row["over_chosen"]
        lines.append(f"| {row['case']} | {row['precision']} | {row['batch']} | {row['tokens']} | {step['flash']:.3f} | "
                     f"{step['math']:.3f} | {step['explicit']:.3f} | {step['chosen']:.3f} | {ratio['flash']:.2f}× | "
                     f"{ratio['math']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(CASES), help="one case only")
    parser.add_argument("--precisions", default="bf16,32", help="comma-separated: bf16, 32 [bf16,32]")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per kernel, after one warm-up [5]")
    parser.add_argument("--results", type=Path, help="write attention_kernels.{md,json} into this folder")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    if args.steps < 1 or not set(precisions) <= {"bf16", "32"}:
        parser.error("--steps must be at least 1 and --precisions a comma-separated subset of bf16,32")
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}", flush=True)
    rows = []
    for name in [args.only] if args.only else list(CASES):
        for precision in precisions:
            if name == "vitb224-mae" and precision == "32" and not args.only:
                continue   # minutes per step in fp32 on 2 cores; ask for it with --only
            rows.append(measure(name, precision, args.steps))
            row = rows[-1]
            print(f"{name} {precision}: " + ", ".join(f"{kernel} {row['step_s'][kernel]:.3f} s" for kernel in KERNELS),
                  flush=True)
    print(table(rows))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/attention_kernels.py " + " ".join(sys.argv[1:])
        (args.results / "attention_kernels.md").write_text(
            f"# Attention kernel of a CPU training step\n\n`{command.strip()}` — {machine['cpu']}, "
            f"{machine['threads']} threads, torch {machine['torch']}; median of {args.steps} interleaved steps "
            f"(forward + backward + AdamW). 'chosen' is `encoder.training_attention`.\n\n{table(rows)}\n")
        (args.results / "attention_kernels.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
