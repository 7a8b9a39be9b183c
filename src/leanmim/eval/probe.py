"""Frozen-feature evaluation: feature extraction, weighted kNN and linear probing.

This module sits at the bottom of the package: it imports no other ``leanmim``
module and only receives callables (``feature_fn``: images -> features) and
tensors.  Everything works on whatever device the tensors live on; the
defaults target CPU.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = [
    "extract_features",
    "knn_accuracy",
    "linear_probe_accuracy",
    "ProbeResult",
    "probe",
    "raw_pixel_features",
]


# --------------------------------------------------------------------------------------
# feature extraction
# --------------------------------------------------------------------------------------
def _autocast_ctx(device_type: str, dtype: torch.dtype | None):
    """torch.autocast(device_type, dtype) if available for this device/dtype, else a no-op."""
    if dtype is None:
        return contextlib.nullcontext()
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    try:
        import warnings

        with warnings.catch_warnings():
            # An unsupported dtype makes autocast warn and disable itself; treat that as "off".
            warnings.simplefilter("ignore")
            return torch.autocast(device_type=device_type, dtype=dtype)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def _progress_iter(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, leave=False)
    except ImportError:  # pragma: no cover - tqdm ships with timm/lightning
        def gen():
            for i, item in enumerate(it):
                if i % 50 == 0:
                    print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)
                yield item

        return gen()


@torch.no_grad()
def extract_features(
    feature_fn: Callable[[Tensor], Tensor],
    dataset,
    batch_size: int = 256,
    batch_transform: nn.Module | None = None,
    device="cpu",
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``feature_fn`` over a labelled dataset of ``(image, label)`` items.

    Images are batched by a ``DataLoader`` (``num_workers=0``, no shuffling, so the
    output keeps dataset order), moved to ``device``, passed through ``batch_transform``
    if given (e.g. uint8 in-memory data -> normalized float; run outside autocast, in
    full precision), then through ``feature_fn`` under
    ``torch.autocast(device_type, autocast_dtype)`` when ``autocast_dtype`` is not None
    and autocast is available for that device.  ``feature_fn`` must map (B, C, H, W) to
    (B, D); outputs with more dims are flattened to (B, -1).

    If ``feature_fn`` (or ``batch_transform``) is an ``nn.Module`` in training mode it is
    switched to eval mode for the extraction and restored afterwards.

    Returns ``(features, labels)``: float32 (N, D) and int64 (N,), both on CPU.
    """
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        drop_last=False,
        pin_memory=device.type == "cuda",
    )
    modules = [m for m in (feature_fn, batch_transform) if isinstance(m, nn.Module)]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for images, targets in _progress_iter(iter(loader), len(loader), "features", progress):
            images = images.to(device, non_blocking=True)
            if batch_transform is not None:
                images = batch_transform(images)
            with _autocast_ctx(device.type, autocast_dtype):
                out = feature_fn(images)
            if out.dim() != 2:
                out = out.reshape(out.shape[0], -1)
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).long().reshape(-1).cpu())
    finally:
        for m, t in zip(modules, was_training):
            m.train(t)
    if not feats:
        raise ValueError("extract_features: empty dataset")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------
# weighted kNN
# --------------------------------------------------------------------------------------
@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Weighted kNN top-1 accuracy (InstDisc / DINO protocol).

    Features are L2-normalised, similarity is cosine, each test sample takes its top-k
    training neighbours, neighbour weights are ``exp(sim / T)``, the class score is the
    sum of weights of the neighbours of that class, and the prediction is the argmax.
    (Weights are computed as ``exp((sim - max_sim) / T)``, a per-row constant factor
    that leaves the argmax unchanged but cannot overflow for small T.)

    The test set is processed in chunks of ``chunk_size`` rows, so peak memory is one
    (chunk_size, N_train) similarity block, never the full (N_test, N_train) matrix.

    The similarity matmul is done in float32: bf16 has an 8-bit mantissa (cosine
    resolution ~4e-3 near 1), which can reorder near-tied neighbours and, through the
    sharp exp(sim/0.07) weighting, flip predictions, while a bf16 matmul measured only
    ~2.3x faster here (the (chunk, N) output is memory bound).  fp32 costs ~9 s for
    60k x 10k x 784 (raw Fashion-MNIST) on 2 CPU cores, ~4-5 s at D=384, so exactness wins.
    """
    if test_features.shape[0] == 0:
        raise ValueError("knn_accuracy: empty test set")
    if train_features.shape[0] == 0:
        raise ValueError("knn_accuracy: empty train set")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    train_labels = train_labels.long().to(train.device)
    test_labels = test_labels.long().to(train.device)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        q = test[start : start + chunk_size]
        sim = q @ train.T  # (c, N_train)
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        del sim
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        pred = votes.argmax(dim=1)
        correct += int((pred == test_labels[start : start + chunk_size]).sum())
    return correct / test.shape[0]


# --------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------
def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Linear probe on cached features (MAE protocol head), returns test top-1 in [0, 1].

    Head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` followed by ``Linear(D, num_classes)``
    (weight ~ trunc-normal std 0.01, bias 0, as in MAE).  Trained with cross-entropy on
    shuffled mini-batches (seeded permutation per epoch, ``drop_last`` when there is more
    than one batch so BatchNorm never sees a tiny batch), then evaluated on the test
    features with BatchNorm in eval mode (running statistics).

    Optimizer: AdamW(lr, betas=(0.9, 0.999), weight_decay) with a per-step schedule of
    linear warmup over the first ~5% of steps (at most 5 epochs) followed by cosine decay
    to 0.  MAE uses LARS (lr 0.1 * bs/256, batch 16384, 90 epochs); on cached features
    with the BN-standardised input, AdamW + cosine converges reliably in far fewer
    steps, with no per-dataset LR tuning, and ~60k x 784 x 100 epochs runs in ~10-20 s
    on a 2-core CPU.  Deterministic for a fixed ``seed``.
    """
    device = train_features.device
    x_train = train_features.float()
    y_train = train_labels.long().to(device)
    n, dim = x_train.shape
    if n < 2:
        raise ValueError("linear_probe_accuracy: need at least 2 training samples")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        w = torch.randn(num_classes, dim, generator=gen).clamp_(-2.0, 2.0).mul_(0.01)
        head.weight.copy_(w)
        head.bias.zero_()
    model = nn.Sequential(bn, head).to(device)

    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop_last (n >= bs by construction)
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = min(int(0.05 * total_steps), 5 * steps_per_epoch)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))

    model.train()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1

    model.eval()
    x_test = test_features.float().to(device)
    y_test = test_labels.long().to(device)
    if x_test.shape[0] == 0:
        raise ValueError("linear_probe_accuracy: empty test set")
    correct = 0
    with torch.no_grad():
        for start in range(0, x_test.shape[0], 8192):
            pred = model(x_test[start : start + 8192]).argmax(dim=1)
            correct += int((pred == y_test[start : start + 8192]).sum())
    return correct / x_test.shape[0]


# --------------------------------------------------------------------------------------
# full probe
# --------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    knn_top1: float
    linear_top1: float | None  # None with linear_epochs 0
    num_train: int
    num_test: int
    feature_dim: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def probe(
    feature_fn: Callable[[Tensor], Tensor],
    train_dataset,
    test_dataset,
    num_classes: int,
    batch_transform: nn.Module | None = None,
    device="cpu",
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    k: int = 20,
    temperature: float = 0.07,
    linear_epochs: int = 100,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 256,
) -> ProbeResult:
    """Extract features for both splits, then run weighted kNN and the linear probe.

    ``seconds`` is the total wall time (extraction + kNN + linear probe).  ``batch_size``
    is the feature-extraction batch size.
    """
    t0 = time.perf_counter()
    common = dict(
        batch_size=batch_size,
        batch_transform=batch_transform,
        device=device,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    tr_x, tr_y = extract_features(feature_fn, train_dataset, **common)
    te_x, te_y = extract_features(feature_fn, test_dataset, **common)
    # kNN and the linear probe run where the features were computed (extract_features returns them on CPU)
    tr_x, tr_y, te_x, te_y = (t.to(device) for t in (tr_x, tr_y, te_x, te_y))
    knn = knn_accuracy(tr_x, tr_y, te_x, te_y, num_classes, k=k, temperature=temperature)
    lin = (linear_probe_accuracy(tr_x, tr_y, te_x, te_y, num_classes, epochs=linear_epochs, seed=seed)
           if linear_epochs > 0 else None)  # 0: kNN only, no linear figure
    return ProbeResult(
        knn_top1=knn,
        linear_top1=lin,
        num_train=int(tr_x.shape[0]),
        num_test=int(te_x.shape[0]),
        feature_dim=int(tr_x.shape[1]),
        seconds=time.perf_counter() - t0,
    )


def raw_pixel_features(images: Tensor) -> Tensor:
    """Raw-pixel baseline ``feature_fn``: (B, C, H, W) -> (B, C*H*W)."""
    return images.flatten(1)
