"""Counted MACs per image (FlopCounterMode, MACs = FLOPs / 2) for every method, as markdown tables.

    python benchmarks/costs.py > benchmarks/results/costs.md

1. Pretraining cost of each method for ViT-B/16 at 224 px: forward MACs per part, training-step MACs, ratio to MAE.
2. LoMaR vs MAE at 224, 384 and 448 px (LoMaR's cost does not grow with resolution).
3. PCAE token compression at fine-tune/inference time vs the authors' ViT-B/16 table.
"""

from __future__ import annotations

from leanmim import api

G = 1e9
PCAE_AUTHORS = {0.0: 17.57, 0.1: 15.34, 0.2: 13.19, 0.3: 11.29, 0.4: 9.53}


def main() -> None:
    print("## Pretraining MACs per image, ViT-B/16 @ 224 (method defaults)\n")
    print("| method | forward parts (G) | forward total (G) | train step (G) | train step / MAE |")
    print("|---|---|---:|---:|---:|")
    mae = None
    for method in ("mae", "pcae", "prmim", "lomar", "ddae"):
        macs = api.cost(method, "vit_base_patch16", 224)["macs"]
        mae = mae or macs["train_step"]
        parts = ", ".join(f"{name} {value / G:.2f}" for name, value in macs.items() if name not in ("total", "train_step"))
        print(f"| {method} | {parts} | {macs['total'] / G:.2f} | {macs['train_step'] / G:.2f} | "
              f"{macs['train_step'] / mae:.2f} |")

    print("\n## LoMaR vs MAE across resolutions, ViT-B/16\n")
    print("| img size | MAE forward (G) | MAE train step (G) | LoMaR forward (G) | LoMaR train step (G) | LoMaR / MAE train |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in (224, 384, 448):
        mae_macs = api.cost("mae", "vit_base_patch16", size)["macs"]
        lomar = api.cost("lomar", "vit_base_patch16", size)["macs"]
        print(f"| {size} | {mae_macs['total'] / G:.2f} | {mae_macs['train_step'] / G:.2f} | {lomar['total'] / G:.2f} | "
              f"{lomar['train_step'] / G:.2f} | {lomar['train_step'] / mae_macs['train_step']:.2f} |")

    print("\n## PCAE token compression, full-image ViT-B/16 encoder @ 224 (drop after blocks 3, 6, 9)\n")
    print("| drop ratio | leanmim (G) | ratio to drop 0 | authors (G) | authors' ratio | difference |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for drop, theirs in PCAE_AUTHORS.items():
        ours = api.cost("mae", "vit_base_patch16", 224, inference=True, token_drop=drop)["macs"]["encoder"]
        base = base or ours
        ours_ratio, their_ratio = ours / base, theirs / PCAE_AUTHORS[0.0]
        print(f"| {drop} | {ours / G:.2f} | {ours_ratio:.4f} | {theirs} | {their_ratio:.4f} | "
              f"{100 * (ours_ratio / their_ratio - 1):+.2f}% |")


if __name__ == "__main__":
    main()
