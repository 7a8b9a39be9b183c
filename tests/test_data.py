"""Tests for leanmim.data: idx parsing, image folders, batch augmentation, splits."""

import gzip
import math
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from leanmim import data as D
from leanmim.data import (BatchEvalTransform, BatchMIMAugment, DataError, ImageFileDataset, build_labelled_splits,
                          build_pretrain_data, default_channels, default_img_size, denormalize, load_image, read_idx)


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and ": " in msg
    for fragment in fragments:
        assert fragment in msg, msg


# ----------------------------------------------------------------------------- idx

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_and_mnist_format_dir(tmp_path, gz):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    splits = {}
    for split, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 5, 5), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 3
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{ext}", images, gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{ext}", labels, gz)
        splits[split] = images, labels
    np.testing.assert_array_equal(read_idx(str(tmp_path / f"train-images-idx3-ubyte{ext}")), splits["train"][0])
    wide = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    write_idx(tmp_path / "wide.idx", wide, gz=False)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "wide.idx")), wide)

    assert default_img_size(str(tmp_path)) == 5 and default_channels(str(tmp_path)) == 1
    pre = build_pretrain_data(str(tmp_path), img_size=8, in_chans=3)
    assert pre.num_images == 6 and pre.in_memory and pre.name == str(tmp_path)
    assert torch.equal(pre.dataset[2], torch.from_numpy(splits["train"][0][2]).expand(3, 5, 5))
    assert pre.batch_transform(torch.stack([pre.dataset[0]])).shape == (1, 3, 8, 8)
    lab = build_labelled_splits(str(tmp_path), img_size=5, in_chans=1)
    assert (len(lab.train), len(lab.test), lab.num_classes) == (6, 4, 3)
    assert lab.class_names == ["0", "1", "2"]
    images, labels = next(iter(DataLoader(lab.test, batch_size=4)))
    assert torch.equal(images[:, 0], torch.from_numpy(splits["t10k"][0]))
    assert labels.tolist() == splits["t10k"][1].tolist()


def test_idx_corrupt(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DataError) as err:
        read_idx(str(bad))
    assert_one_line(err, "magic", str(bad))
    with pytest.raises(DataError):  # also via the directory
        build_pretrain_data(str(tmp_path), 28, 1)
    short = tmp_path / "short.gz"
    write_idx(short, np.zeros((2, 3, 3), np.uint8), gz=True)
    short.write_bytes(gzip.compress(gzip.decompress(short.read_bytes())[:-2]))
    with pytest.raises(DataError) as err:
        read_idx(str(short))
    assert_one_line(err, "header")
    notgz = tmp_path / "x.gz"
    notgz.write_bytes(b"not gzip")
    with pytest.raises(DataError):
        read_idx(str(notgz))


@pytest.mark.skipif(not os.path.isdir(D.FASHION_MNIST_DIR), reason="Fashion-MNIST package not installed")
def test_fashion_mnist():
    pre = build_pretrain_data("fashion-mnist", img_size=28, in_chans=1)
    assert pre.num_images == 60000 and pre.name == "fashion-mnist" and pre.in_memory
    assert pre.dataset[0].shape == (1, 28, 28) and pre.dataset[0].dtype == torch.uint8
    assert default_channels("fashion-mnist") == 1 and default_img_size("fashion-mnist") == 28
    lab = build_labelled_splits("fashion-mnist", img_size=32, in_chans=3)
    assert (len(lab.train), len(lab.test), lab.num_classes) == (60000, 10000, 10)
    assert lab.class_names[0] == "T-shirt/top" and lab.mean == (D.FASHION_MNIST_MEAN,) * 3
    image, label = lab.test[0]
    assert image.shape == (3, 28, 28) and isinstance(label, int)
    assert lab.batch_transform(image[None]).shape == (1, 3, 32, 32)
    x = read_idx(os.path.join(D.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")) / 255.0
    assert abs(x.mean() - pre.mean[0]) < 1e-3 and abs(x.std() - pre.std[0]) < 1e-3


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(D.idx, "FASHION_MNIST_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError) as err:
        build_pretrain_data("fashion-mnist", 28, 1)
    assert_one_line(err, "sudo apt-get install dataset-fashion-mnist", "--data DIR")


# ----------------------------------------------------------------------------- image folders

RGB = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def make_mixed_folder(root):
    """4 readable images (RGB png, RGBA PNG upper-case ext, gray jpg, 16-bit png) + 2 bad files."""
    (root / "sub").mkdir(parents=True)
    Image.fromarray(RGB).save(root / "rgb.png")
    rgba = np.dstack([RGB, np.where(np.arange(10) < 5, 0, 255).astype(np.uint8)[None].repeat(12, 0)])
    Image.fromarray(rgba).save(root / "sub" / "rgba.PNG")
    Image.fromarray(RGB[..., 0]).save(root / "sub" / "gray.jpg")
    g16 = np.full((8, 8), 65535, dtype=np.uint16)
    g16[:, 4:], g16[7, 0], g16[7, 7] = 32896, 0, 257
    Image.fromarray(g16).save(root / "g16.png")
    Image.fromarray(RGB).save(root / "full.jpg", quality=95)
    raw = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    (root / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (root / "notes.png").write_text("this is not an image")
    (root / "readme.txt").write_text("ignored: not an image extension")


def test_load_image_conversions(tmp_path):
    make_mixed_folder(tmp_path)
    g16 = load_image(str(tmp_path / "g16.png"), 1)
    assert g16.dtype == torch.uint8 and g16.shape == (1, 8, 8)
    assert (g16[0, 0, 0], g16[0, 0, 7], g16[0, 7, 0], g16[0, 7, 7]) == (255, 128, 0, 1)
    rgba = load_image(str(tmp_path / "sub" / "rgba.PNG"), 3)
    assert rgba.shape == (3, 12, 10)
    assert (rgba[:, :, :5] == 0).all() and torch.equal(rgba[:, :, 5:], torch.from_numpy(RGB).permute(2, 0, 1)[:, :, 5:])
    gray = load_image(str(tmp_path / "rgb.png"), 1)
    luma = (RGB.astype(float) @ [0.299, 0.587, 0.114]).round()
    assert gray.shape == (1, 12, 10) and np.abs(gray[0].numpy() - luma).max() <= 1
    assert torch.equal(load_image(str(tmp_path / "sub" / "gray.jpg"), 3)[0], load_image(str(tmp_path / "sub" / "gray.jpg"), 3)[2])
    Image.fromarray(RGB).convert("P").save(tmp_path / "pal.png")  # palette -> real colours, not indices
    Image.fromarray(RGB).convert("P").convert("RGB").save(tmp_path / "pal_ref.png")
    assert torch.equal(load_image(str(tmp_path / "pal.png"), 3), load_image(str(tmp_path / "pal_ref.png"), 3))
    with pytest.raises(OSError):
        load_image(str(tmp_path / "truncated.jpg"), 3)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_folder_skips_bad_files(tmp_path, in_chans):
    make_mixed_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        pre = build_pretrain_data(str(tmp_path), img_size=16, in_chans=in_chans)
    assert len([w for w in record if "skipping" in str(w.message)]) == 2
    assert sorted(os.path.basename(f) for f in pre.skipped_files) == ["notes.png", "truncated.jpg"]
    assert pre.num_images == 4 and pre.in_memory and len(pre.dataset) == 4
    # whole images: shorter side S = stored_size(16) = 18, the 12 x 10 images keep their shape (21 x 18)
    g16, size = pre.dataset[0]  # sorted order: g16.png, rgb.png, sub/gray.jpg, sub/rgba.PNG
    assert D.stored_size(16) == 18 and g16.shape == (in_chans, 21, 18) and size.tolist() == [18, 18]
    assert [pre.dataset[i][1].tolist() for i in (1, 2, 3)] == [[21, 18]] * 3
    assert len(pre.mean) == len(pre.std) == in_chans and all(0 < s < 1 for s in pre.std)
    assert g16[:, 0, 0].tolist() == [255] * in_chans and g16[:, 0, 17].tolist() == [128] * in_chans
    assert torch.equal(g16[:, 18:], g16[:, 17:18].expand(-1, 3, -1))  # the last row repeats below the image
    images, sizes = next(iter(DataLoader(pre.dataset, batch_size=4)))
    assert pre.batch_transform([images, sizes]).shape == (4, in_chans, 16, 16)
    assert default_channels(str(tmp_path)) == 3 and default_img_size(str(tmp_path)) is None


def test_folder_streaming_and_parallel_decode(tmp_path, monkeypatch):
    make_mixed_folder(tmp_path)
    with pytest.warns(UserWarning):
        stream = build_pretrain_data(str(tmp_path), img_size=16, in_chans=3, max_memory_bytes=0)
    assert not stream.in_memory and isinstance(stream.batch_transform, D.augment.BatchFlipNormalize) and stream.num_images == 4
    assert len(stream.skipped_files) == 2  # found by the statistics sample up front
    x = stream.dataset[1]  # streamed items are uint8 crops; the flip + normalisation run on the batch
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    assert stream.batch_transform(x[None]).shape == (1, 3, 16, 16)
    with pytest.warns(UserWarning):  # augment=False: deterministic evaluation view
        plain = build_pretrain_data(str(tmp_path), img_size=16, in_chans=3, max_memory_bytes=0, augment=False)
        cached = build_pretrain_data(str(tmp_path), img_size=16, in_chans=3, augment=False)
    assert torch.equal(plain.dataset[1], plain.dataset[1]) and isinstance(cached.batch_transform, BatchEvalTransform)
    assert isinstance(plain.batch_transform, BatchEvalTransform) and plain.dataset[1].dtype == torch.uint8
    batch = torch.stack([cached.dataset[i] for i in range(4)])
    assert torch.equal(cached.batch_transform(batch, generator=None), cached.batch_transform(batch))
    streamed = plain.batch_transform(plain.dataset[0][None])[0]
    torch.testing.assert_close(cached.batch_transform(batch)[0], streamed, atol=0.05, rtol=0)  # square g16.png
    monkeypatch.setattr(D.folder, "PARALLEL_DECODE_MIN_FILES", 0)  # decode with DataLoader workers
    with pytest.warns(UserWarning):
        parallel = build_pretrain_data(str(tmp_path), img_size=16, in_chans=3)
    serial = build_pretrain_data(str(tmp_path / "sub"), img_size=16, in_chans=3)
    assert parallel.num_images == 4 and torch.equal(parallel.dataset.images[2:], serial.dataset.images)
    assert torch.equal(parallel.dataset.sizes[2:], serial.dataset.sizes)


def test_streaming_replaces_bad_sample(tmp_path):
    make_mixed_folder(tmp_path)
    files = [str(tmp_path / f) for f in ("rgb.png", "notes.png", "g16.png", "truncated.jpg")]
    ds = ImageFileDataset(files, 1, v2.Identity(), labels=[0, 1, 2, 3])
    with pytest.warns(UserWarning, match="notes.png"):
        image, label = ds[1]
    assert label == 2 and torch.equal(image, load_image(files[2], 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is not warned about again
        assert ds[1][1] == 2
    assert ds.skipped_files == [files[1]]
    # failures inside a DataLoader worker process reach the main process's skipped_files
    labels = [y for _, y in DataLoader(ds, batch_size=None, num_workers=1)]
    assert labels == [0, 2, 2, 0] and ds.skipped_files == [files[1], files[3]]
    data = D.MIMData(ds, None, (0.5,), (0.5,), 4, [], "x", False)
    assert data.skipped_files == [files[1], files[3]]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError) as err:
        build_pretrain_data(str(tmp_path / "missing"), 32, 3)
    assert_one_line(err, "does not exist", "--data fashion-mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        build_pretrain_data(str(tmp_path / "empty"), 32, 3)
    assert_one_line(err, "no image files", ".png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("nope")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.warns(UserWarning), pytest.raises(DataError) as err:
        build_pretrain_data(str(tmp_path / "bad"), 32, 3)
    assert_one_line(err, "could be read")
    (tmp_path / "f.png").write_text("x")
    with pytest.raises(DataError) as err:
        build_pretrain_data(str(tmp_path / "f.png"), 32, 3)
    assert_one_line(err, "not a directory")
    with pytest.raises(DataError) as err:
        build_pretrain_data(str(tmp_path), 32, 2)
    assert_one_line(err, "in_chans=2")


def make_labelled(root, test_name="test"):
    rng = np.random.default_rng(2)
    for split, n in (("train", 3), (test_name, 2)):
        for cls, value in (("cat", 50), ("dog", 200)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                px = np.clip(value + rng.integers(-5, 6, (9, 11)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("max_memory_bytes", [4 << 30, 0])
def test_labelled_layout(tmp_path, max_memory_bytes):
    make_labelled(tmp_path, "val")
    lab = build_labelled_splits(str(tmp_path), img_size=8, in_chans=1, max_memory_bytes=max_memory_bytes)
    assert (len(lab.train), len(lab.test), lab.num_classes, lab.class_names) == (6, 4, 2, ["cat", "dog"])
    images, labels = next(iter(DataLoader(lab.train, batch_size=6)))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    if lab.batch_transform is not None:
        assert images.dtype == torch.uint8 and images.shape == (6, 1, 9, 9)
        images = lab.batch_transform(images)
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.float32
    assert images[:3].mean() < 0 < images[3:].mean()  # dark cats, bright dogs after normalization
    pre = build_pretrain_data(str(tmp_path), img_size=8, in_chans=1)
    assert pre.num_images == 6  # pretraining uses the train split only
    assert default_channels(str(tmp_path)) == 1


def test_unlabelled_layout_has_no_splits(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    with pytest.raises(DataError) as err:
        build_labelled_splits(str(tmp_path), 8, 3)
    assert_one_line(err, "train", "<class>")
    make_labelled(tmp_path / "x")
    (tmp_path / "x" / "test" / "bird").mkdir()
    with pytest.raises(DataError) as err:
        build_labelled_splits(str(tmp_path / "x"), 8, 3)
    assert_one_line(err, "bird")


# ----------------------------------------------------------------------------- batch transforms

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def normalize(x):
    return (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_augment_shape_and_identity():
    x = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    aug = BatchMIMAugment(16, MEAN, STD)
    for inp in (x, x.float() / 255):
        out = aug(inp)
        assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    ident = BatchMIMAugment(20, MEAN, STD, scale=(1, 1), ratio=(1, 1), hflip=False)
    torch.testing.assert_close(ident(x), normalize(x), atol=1e-4, rtol=0)
    flip = BatchMIMAugment(20, MEAN, STD, scale=(1, 1), ratio=(1, 1), hflip=True)
    out = flip(x.repeat(8, 1, 1, 1), torch.Generator().manual_seed(0))
    ref = normalize(x.repeat(8, 1, 1, 1))
    flipped = [(o - r.flip(-1)).abs().max() < 1e-4 for o, r in zip(out, ref)]
    same = [(o - r).abs().max() < 1e-4 for o, r in zip(out, ref)]
    assert all(f ^ s for f, s in zip(flipped, same)) and 5 < sum(flipped) < 35


def test_augment_determinism():
    x = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    aug = BatchMIMAugment(16, MEAN, STD)
    a = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(4)))


def test_augment_crop_geometry():
    """Column/row ramps reveal each output's source box: it matches sample_crops and its area
    fraction and aspect ratio stay within the RandomResizedCrop bounds."""
    n, size, out = 256, 64, 8
    ramp = torch.arange(size, dtype=torch.float32) / size
    x = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size)])[None].expand(n, 2, size, size)
    aug = BatchMIMAugment(out, (0.0, 0.0), (1.0, 1.0), scale=(0.2, 1.0), hflip=False, interpolation="bilinear")
    y = aug(x, torch.Generator().manual_seed(0)) * size  # pixel coordinates of the sampling points
    boxes = aug.sample_crops(n, size, size, torch.Generator().manual_seed(0))
    w = (y[:, 0, 0, -1] - y[:, 0, 0, 0]) * out / (out - 1)
    h = (y[:, 1, -1, 0] - y[:, 1, 0, 0]) * out / (out - 1)
    left, top = y[:, 0, 0, 0] - w / (2 * out) + 0.5, y[:, 1, 0, 0] - h / (2 * out) + 0.5
    torch.testing.assert_close(torch.stack([top, left, h, w], 1), boxes.float(), atol=1e-3, rtol=0)
    frac, ratio = w * h / size**2, w / h
    assert frac.min() > 0.2 * 0.93 and frac.max() <= 1 and frac.min() < 0.3 and frac.max() > 0.9
    assert ratio.min() > 0.75 * 0.93 and ratio.max() < 4 / 3 / 0.93
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size + 1e-3).all() and (left + w <= size + 1e-3).all()
    torch.manual_seed(0)  # same area distribution as torchvision's RandomResizedCrop
    tv = [math.prod(v2.RandomResizedCrop.get_params(x[0], [0.2, 1.0], [3 / 4, 4 / 3])[2:]) / size**2
          for _ in range(n)]
    assert abs(frac.mean().item() - np.mean(tv)) < 0.05


def test_augment_fallback_is_central_crop():
    aug = BatchMIMAugment(8, (0.0,), (1.0,), scale=(1.0, 1.0), ratio=(2.0, 3.0))
    boxes = aug.sample_crops(3, 20, 20, torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[5.0, 0.0, 10.0, 20.0]] * 3  # torchvision: w = W, h = round(W / 2)


def test_eval_transform_and_denormalize():
    x = torch.randint(0, 256, (2, 3, 18, 18), dtype=torch.uint8)
    ev = BatchEvalTransform(16, MEAN, STD, crop_size=16)
    torch.testing.assert_close(ev(x), normalize(x[..., 1:17, 1:17]))
    up = BatchEvalTransform(32, MEAN, STD)(x)
    assert up.shape == (2, 3, 32, 32) and torch.equal(up, BatchEvalTransform(32, MEAN, STD)(x))
    torch.testing.assert_close(denormalize(normalize(x), MEAN, STD), x.float() / 255)


# ----------------------------------------------------------------------------- EXIF, whole images, DDP draws

def test_exif_orientation_is_applied(tmp_path):
    """A photo stored landscape with EXIF orientation 6 (turn 90 degrees clockwise to display) is read portrait,
    as viewers show it; its header size and the whole-image store agree."""
    stored = np.random.default_rng(5).integers(0, 256, (6, 10, 3), dtype=np.uint8)  # 6 rows x 10 columns
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    image = load_image(str(tmp_path / "rotated.png"), 3)
    assert torch.equal(image, torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1))  # (3, 10, 6)
    assert D.common.displayed_size(str(tmp_path / "rotated.png")) == (10, 6)
    pre = build_pretrain_data(str(tmp_path), img_size=7, in_chans=3)  # S = 8: shorter side 6 -> 8, longer 10 -> 13
    assert pre.dataset[0][0].shape == (3, 13, 8) and pre.dataset[0][1].tolist() == [13, 8]


def test_whole_image_crops_stay_inside_each_image():
    """Two images of different shapes on one canvas: every crop lies inside its own image (never in the
    padding), and an image that fills the canvas is cropped exactly as a plain batch would be."""
    aug = BatchMIMAugment(8, (0.0,), (1.0,), scale=(0.2, 1.0), hflip=False)
    sizes = torch.tensor([[20, 40], [30, 12]] * 64)
    boxes = aug.sample_crops(128, sizes[:, 0], sizes[:, 1], torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    assert (w[0::2] > 20).any()  # the wide image is cropped beyond its central square
    canvas = torch.randint(0, 256, (2, 1, 30, 40), dtype=torch.uint8)
    full = torch.tensor([[30, 40], [30, 40]])
    whole = aug([canvas, full], torch.Generator().manual_seed(1))
    assert torch.equal(whole, aug(canvas, torch.Generator().manual_seed(1)))


def test_augmentation_depends_on_the_global_position_only():
    """2 processes x 4 images draw the crops and flips that 1 process x 8 images draws (issue 15 section 3)."""
    x = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    aug = BatchMIMAugment(16, MEAN, STD)
    one = aug(x, torch.Generator().manual_seed(7))
    two = [aug(x[4 * r:4 * r + 4], torch.Generator().manual_seed(7), rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(two), one)
