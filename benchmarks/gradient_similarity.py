"""Do partial-reconstruction variants push the encoder the way full MAE does? (docs/methods.md §3 diagnostic)

For each batch: same weights, same images, same masking (every method draws its mask first from the
same seeded BatchRandom). We take the gradient of each method's loss with respect to all encoder
parameters, flattened, and report its cosine similarity with full MAE's gradient, averaged over
batches. Measured three times, on weights every method then shares: at initialisation; after
``--warmup-steps`` of MAE training; after as many steps of PR-MIM training from the same init (MAE-trained
weights have never seen the aggregation path, so PR-MIM's thrown-token loss is off its own trajectory there).

A reference row, "MAE, other mask", compares MAE with itself on a different masking of the same
images: how much the gradient moves anyway from batch noise.

    .venv/bin/python benchmarks/gradient_similarity.py            # Fashion-MNIST 28 px, patch 4, small ViT
    .venv/bin/python benchmarks/gradient_similarity.py --data random
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from leanmim.config import ModelConfig
from leanmim.methods import build_method
from leanmim.parts.tokens import BatchRandom, num_visible

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"

VARIANTS = {
    "plain partial (random keep, thrown unsupervised)": {"throw_selection": "random", "thrown_reconstruction": "none"},
    "partial, furthest keep, thrown unsupervised": {"throw_selection": "furthest", "thrown_reconstruction": "none"},
    "PR-MIM random keep + aggregate": {"throw_selection": "random", "thrown_reconstruction": "aggregate"},
    "PR-MIM (furthest + aggregate, default)": {"throw_selection": "furthest", "thrown_reconstruction": "aggregate"},
    "PR-MIM furthest + last_block": {"throw_selection": "furthest", "thrown_reconstruction": "last_block"},
}


def load_images(data: str, count: int, seed: int) -> torch.Tensor:
    """(count, 1, 28, 28) standardized images: Fashion-MNIST if available, else Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    if data != "random" and os.path.exists(data):
        from leanmim.data import read_idx
        pixels = torch.from_numpy(read_idx(data).copy()).float() / 255
        pixels = pixels[torch.randperm(len(pixels), generator=generator)[:count]]
        return ((pixels - pixels.mean()) / pixels.std())[:, None]
    return torch.randn(count, 1, 28, 28, generator=generator)


def encoder_gradient(method, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Flattened gradient of the method's loss w.r.t. every encoder parameter, for a seeded masking."""
    method.zero_grad(set_to_none=True)
    method(images, rng=BatchRandom(seed=seed)).loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in method.encoder.parameters()])


def similarities(mae, variants: dict, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, float]]:
    """Per variant: (num_batches,) cosine similarities of its encoder gradient with MAE's (same batch and
    masking), and the cosine similarity of the two gradients summed over all batches (less noisy)."""
    for variant in variants.values():
        variant.load_state_dict(mae.state_dict())
    names = ["MAE, other mask", *variants]
    per_batch = {name: [] for name in names}
    summed = {name: 0.0 for name in [*names, "MAE"]}
    for index, images in enumerate(batches):
        gradients = {"MAE": encoder_gradient(mae, images, seed=index),
                     "MAE, other mask": encoder_gradient(mae, images, seed=10_000 + index)}
        gradients.update({name: encoder_gradient(variant, images, seed=index) for name, variant in variants.items()})
        for name in names:
            per_batch[name].append(torch.cosine_similarity(gradients["MAE"], gradients[name], dim=0))
        for name, gradient in gradients.items():
            summed[name] = summed[name] + gradient
    return {name: (torch.stack(per_batch[name]), torch.cosine_similarity(summed["MAE"], summed[name], dim=0).item())
            for name in names}


def train(method, images: torch.Tensor, steps: int, batch_size: int, lr: float) -> dict[str, float]:
    """A few AdamW steps of ``method``'s own objective; returns the last step's loss and logs."""
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    generator = torch.Generator().manual_seed(1)
    out = None
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        out = method(batch, rng=BatchRandom(seed=100_000 + step))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return {"loss": out.loss.item(), **{name: value.item() for name, value in out.logs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=FASHION_MNIST, help="Fashion-MNIST idx images, or 'random'")
    parser.add_argument("--batches", type=int, default=12, help="batches averaged over")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=250,
                        help="training steps (of MAE, then of PR-MIM, each from the same init) before measuring again")
    parser.add_argument("--throw-ratio", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = ModelConfig(name="vit_tiny_patch16", img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=4,
                        num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4).resolved()
    mae = build_method("mae", model, {})
    variants = {name: build_method("prmim", model, {"throw_ratio": args.throw_ratio, **options})
                for name, options in VARIANTS.items()}
    num_masked = model.num_patches - num_visible(model.num_patches, 0.75)
    num_throw = next(iter(variants.values())).num_thrown
    images = load_images(args.data, 8192, args.seed)
    batches = list(images[:args.batches * args.batch_size].split(args.batch_size))
    print(f"data: {'Fashion-MNIST' if args.data != 'random' and os.path.exists(args.data) else 'random images'}, "
          f"28 px, patch 4: {model.num_patches} patches; mask 0.75, throw {args.throw_ratio} of all patches -> "
          f"decoder keeps {num_masked - num_throw} of {num_masked} masked tokens, "
          f"throws {num_throw}; ViT d{model.embed_dim}×{model.depth}, decoder d{model.decoder_embed_dim}×"
          f"{model.decoder_depth}; {args.batches} batches of {args.batch_size}")
    started = time.time()
    initial = {name: value.clone() for name, value in mae.state_dict().items()}
    prmim = variants["PR-MIM (furthest + aggregate, default)"]
    phases = [("at initialisation", None), (f"after {args.warmup_steps} MAE steps", mae),
              (f"after {args.warmup_steps} PR-MIM steps", prmim)]
    for phase, trainer in phases:
        if trainer is not None:
            trainer.load_state_dict(initial)
            logs = train(trainer, images, args.warmup_steps, args.batch_size, lr=1.5e-3)
            phase += " (last step: " + ", ".join(f"{name} {value:.3f}" for name, value in logs.items()) + ")"
            mae.load_state_dict(trainer.state_dict())
        print(f"\ncosine(encoder gradient, full MAE's) {phase}:\n  {'':52s} per batch (mean ± std)   summed over batches")
        for name, (values, of_sums) in similarities(mae, variants, batches).items():
            print(f"  {name:52s} {values.mean():.3f} ± {values.std():.3f}            {of_sums:.3f}", flush=True)
    print(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
