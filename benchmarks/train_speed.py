"""MAE training-step speed on this machine: bf16 autocast vs fp32, side by side in one run.

A step is forward + backward + AdamW update, as the engine runs it. Configurations are
interleaved (A, B, A, B, …) so machine drift hits both alike; the median step time is used.
The bf16 matrix-product peak is measured in the same run, and the achieved fraction of it is
(counted training MACs × 2) / step time / peak.

    python benchmarks/train_speed.py                 # small config and ViT-B/16
    python benchmarks/train_speed.py --only small --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from leanmim.config import ModelConfig
from leanmim.eval.cost import count_train_step
from leanmim.parts.encoder import training_attention
from leanmim.methods import build_method

CONFIGS = {
    # 32 px, patch 4, width 192 × 12 blocks, decoder 128 × 2, batch 256
    "small": dict(model=dict(name="vit_tiny_patch16", img_size=32, patch_size=4, in_chans=3, decoder_embed_dim=128,
                             decoder_depth=2, decoder_num_heads=4), batch=256),
    "vit_b": dict(model=dict(name="vit_base_patch16", img_size=224, in_chans=3), batch=16),
}


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 20) -> float:
    """FLOP/s of a size² × size² matrix product in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


class Stepper:
    """One method + AdamW, stepping on a fixed batch in a given precision."""

    def __init__(self, model: ModelConfig, batch: int, bf16: bool, compile_model: bool):
        torch.manual_seed(0)
        self.method = build_method("mae", model, {})
        self.optimizer = torch.optim.AdamW(self.method.parameters(), lr=1e-4, betas=(0.9, 0.95))
        self.images = torch.randn(batch, model.in_chans, model.img_size, model.img_size)
        self.bf16 = bf16
        self.forward = torch.compile(self.method) if compile_model else self.method

    def step(self) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16), \
                training_attention(self.method, "cpu"):
            loss = self.forward(self.images).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision (after 2 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the method")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"matmul peak 2048²: bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f} TFLOP/s "
          f"({peak_bf16 / peak_fp32:.1f}×), threads {torch.get_num_threads()}")
    results = {"peak_bf16_flops": peak_bf16, "peak_fp32_flops": peak_fp32, "compile": args.compile, "configs": {}}
    for name, spec in CONFIGS.items():
        if args.only and name != args.only:
            continue
        model = ModelConfig(**spec["model"]).resolved()
        batch = spec["batch"]
        macs = count_train_step(build_method("mae", model, {}), torch.randn(2, model.in_chans, model.img_size,
                                                                             model.img_size))
        steppers = {"bf16": Stepper(model, batch, True, args.compile), "fp32": Stepper(model, batch, False, args.compile)}
        for stepper in steppers.values():
            stepper.step(), stepper.step()  # warm-up (allocation, compilation)
        times = {key: [] for key in steppers}
        for _ in range(args.steps):
            for key, stepper in steppers.items():
                times[key].append(stepper.step())
        row = {}
        for key, values in times.items():
            step = statistics.median(values)
            row[key] = {"images_per_s": batch / step, "step_s": step,
                        "fraction_of_bf16_peak": 2 * macs * batch / step / peak_bf16}
        row["bf16_over_fp32"] = row["bf16"]["images_per_s"] / row["fp32"]["images_per_s"]
        row["train_macs_per_image"] = macs
        results["configs"][name] = row
        print(f"{name} (batch {batch}, {macs / 1e9:.2f} GMACs/image/step): "
              f"bf16 {row['bf16']['images_per_s']:.1f} img/s ({100 * row['bf16']['fraction_of_bf16_peak']:.0f}% of peak), "
              f"fp32 {row['fp32']['images_per_s']:.1f} img/s, bf16/fp32 = {row['bf16_over_fp32']:.2f}×")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
