import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from leanmim.eval.probe import (ProbeResult, extract_features, knn_accuracy, linear_probe_accuracy, probe,
                                raw_pixel_features)


# ----------------------------------------------------------------------------- kNN
def _unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def _brute_force_knn(train, train_y, query, num_classes, k, T, weighted=True):
    """Plain-python reference: cosine sim, top-k, exp(sim/T) (or 1) votes, argmax."""
    def norm(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    q = norm(query)
    sims = [(sum(a * b for a, b in zip(q, norm(t))), y) for t, y in zip(train, train_y)]
    sims.sort(key=lambda s: -s[0])
    scores = [0.0] * num_classes
    for s, y in sims[:k]:
        scores[y] += math.exp(s / T) if weighted else 1.0
    return max(range(num_classes), key=lambda c: scores[c])


# 6 train points (2-D, deliberately not unit norm), 3 classes; 3 test points.
TRAIN_DEG = [5, 50, -55, 180, 150, 100]
TRAIN_Y = [0, 1, 1, 0, 1, 2]
TRAIN_SCALE = [3.0, 0.5, 2.0, 1.0, 7.0, 0.2]
TEST_DEG = [0, 120, 165]


def _tiny():
    train = [[s * a for a in _unit(d)] for d, s in zip(TRAIN_DEG, TRAIN_SCALE)]
    test = [[2.5 * a for a in _unit(d)] for d in TEST_DEG]
    return train, test


def _pred_is(train, test_point, label, k, T):
    """knn_accuracy on a single query with `label` is 1.0 iff the predicted class is `label`."""
    return (
        knn_accuracy(
            torch.tensor(train),
            torch.tensor(TRAIN_Y),
            torch.tensor([test_point]),
            torch.tensor([label]),
            num_classes=3,
            k=k,
            temperature=T,
        )
        == 1.0
    )


@pytest.mark.parametrize("k", [2, 3])
def test_knn_matches_brute_force(k):
    train, test = _tiny()
    T = 0.07
    preds = [_brute_force_knn(train, TRAIN_Y, q, 3, k, T) for q in test]
    for q, p in zip(test, preds):
        assert _pred_is(train, q, p, k, T)
        for other in {0, 1, 2} - {p}:
            assert not _pred_is(train, q, other, k, T)
    # accuracy against some labels equals the brute-force accuracy
    labels = [0, 1, 2]
    expected = sum(p == y for p, y in zip(preds, labels)) / 3
    got = knn_accuracy(torch.tensor(train), torch.tensor(TRAIN_Y), torch.tensor(test), torch.tensor(labels), 3, k=k, temperature=T)
    assert got == pytest.approx(expected)


def test_knn_weighted_vote_differs_from_majority():
    train, test = _tiny()
    q = test[0]  # neighbours: class 0 at 5 deg (sim .996), class 1 at 50 and -55 deg (.64, .57)
    k, T = 3, 0.07
    weighted = _brute_force_knn(train, TRAIN_Y, q, 3, k, T, weighted=True)
    majority = _brute_force_knn(train, TRAIN_Y, q, 3, k, T, weighted=False)
    assert (weighted, majority) == (0, 1)
    assert _pred_is(train, q, 0, k, T)
    # a very large temperature makes the weights ~uniform -> majority vote wins
    assert _pred_is(train, q, 1, k, 100.0)


def test_knn_chunking_identical_and_k_clamped():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 16, generator=g)
    train_y = torch.randint(0, 5, (200,), generator=g)
    test = torch.randn(53, 16, generator=g)
    test_y = torch.randint(0, 5, (53,), generator=g)
    ref = knn_accuracy(train, train_y, test, test_y, 5, k=10, chunk_size=1024)
    for cs in (1, 7, 52, 53):
        assert knn_accuracy(train, train_y, test, test_y, 5, k=10, chunk_size=cs) == ref
    # k larger than the train set is clamped
    acc = knn_accuracy(train[:4], train_y[:4], test, test_y, 5, k=20)
    assert 0.0 <= acc <= 1.0
    # perfect on the train set itself with k=1
    assert knn_accuracy(train, train_y, train, train_y, 5, k=1) == 1.0


# ----------------------------------------------------------------------------- linear probe
def _blobs(n_per_class, num_classes, dim, gen, sep=6.0):
    means = torch.randn(num_classes, dim, generator=gen) * sep
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = means[y] + torch.randn(len(y), dim, generator=gen) + 3.0  # offset/scale handled by BN
    return x * 5.0, y


def test_linear_probe_separable_blobs():
    g = torch.Generator().manual_seed(1)
    x, y = _blobs(150, 4, 16, g)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:400], perm[400:]
    acc = linear_probe_accuracy(x[tr], y[tr], x[te], y[te], 4, epochs=20, batch_size=64, lr=1e-2)
    assert acc >= 0.99


def test_linear_probe_random_labels_chance_and_deterministic():
    g = torch.Generator().manual_seed(3)
    xtr = torch.randn(48, 64, generator=g)
    ytr = torch.randint(0, 2, (48,), generator=g)
    xte = torch.randn(2000, 64, generator=g)
    yte = torch.randint(0, 2, (2000,), generator=g)
    kw = dict(epochs=60, batch_size=16, lr=1e-2, seed=5)
    test_acc = linear_probe_accuracy(xtr, ytr, xte, yte, 2, **kw)
    assert 0.4 < test_acc < 0.6  # no signal -> chance (std ~0.011 at n=2000 + overfit noise)
    # yet the optimizer works: 48 points in 64-D are linearly separable, so it memorises them
    assert linear_probe_accuracy(xtr, ytr, xtr, ytr, 2, **kw) >= 0.9
    assert linear_probe_accuracy(xtr, ytr, xte, yte, 2, **kw) == test_acc


# ----------------------------------------------------------------------------- extraction
class _ToFloat(nn.Module):
    def forward(self, x):
        return x.float() / 255.0 - 0.5


def test_extract_features_order_transform_dtype():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(10) % 3
    ds = TensorDataset(images, labels)
    seen = []

    def fn(x):
        seen.append(x.dtype)
        return raw_pixel_features(x)

    feats, labs = extract_features(fn, ds, batch_size=3, batch_transform=_ToFloat())
    assert seen == [torch.float32] * 4  # transform applied before feature_fn, 3+3+3+1
    assert feats.dtype == torch.float32 and labs.dtype == torch.int64
    assert feats.shape == (10, 16) and feats.device.type == "cpu"
    torch.testing.assert_close(feats, (images.float() / 255.0 - 0.5).flatten(1))
    assert torch.equal(labs, labels)


def test_extract_features_autocast_output_float32_and_restores_mode():
    torch.manual_seed(0)
    images = torch.randn(7, 2, 3, 3)
    ds = TensorDataset(images, torch.zeros(7, dtype=torch.long))
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 5), nn.Dropout(0.9)).train()
    feats, _ = extract_features(model, ds, batch_size=4)  # bf16 autocast by default
    assert feats.dtype == torch.float32 and feats.shape == (7, 5)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        ref = model(images)
    torch.testing.assert_close(feats, ref, atol=0.05, rtol=0.05)  # dropout was off, bf16 tolerance
    feats32, _ = extract_features(model, ds, batch_size=4, autocast_dtype=None)
    torch.testing.assert_close(feats32, ref)


def test_raw_pixel_features_shape():
    assert raw_pixel_features(torch.zeros(5, 3, 8, 6)).shape == (5, 144)


# ----------------------------------------------------------------------------- probe
def test_probe_end_to_end():
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 2
        x = torch.randint(0, 100, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
        x[y == 1] += 120  # bright vs dark images
        return TensorDataset(x, y)

    res = probe(raw_pixel_features, make(64), make(32), num_classes=2, batch_transform=_ToFloat(), k=5, linear_epochs=10)
    assert isinstance(res, ProbeResult)
    assert (res.num_train, res.num_test, res.feature_dim) == (64, 32, 16)
    assert res.knn_top1 == 1.0 and res.linear_top1 >= 0.9
    d = res.as_dict()
    assert set(d) == {"knn_top1", "linear_top1", "num_train", "num_test", "feature_dim", "seconds"}
    assert d["seconds"] > 0
