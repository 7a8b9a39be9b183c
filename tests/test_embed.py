"""leanmim embed: one row per readable image, the run's own evaluation view and normalisation, the probe's pooling,
a fine-tuning's head input, atomic and refusing to overwrite, bad images skipped and counted."""

import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import tiny_model, tiny_run_config
from test_use import FAST, make_folder, read_rows
from leanmim import api
from leanmim.cli import main
from leanmim.eval.embed import read_embeddings
from leanmim.train.pretrain import pretrain
from leanmim.weights import load_finetuned, load_run

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore:embed skipped"),
              pytest.mark.filterwarnings("ignore:skipping unreadable image"),
              pytest.mark.filterwarnings("ignore:predict skipped")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("embed") / "photos", per_class=(24, 6))


@pytest.fixture(scope="module")
def pretrained(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("embed-run") / "run"
    config = tiny_run_config(folder, run, epochs=1, batch_size=16)
    pretrain(dataclasses.replace(config, model=tiny_model(in_chans=3)))
    return run


@pytest.fixture(scope="module")
def finetuned(pretrained):
    api.finetune(pretrained, epochs=2, val_fraction=0.25, **FAST)
    return pretrained / "finetune"


@pytest.fixture
def images(folder, tmp_path):
    """The 12 test pictures (in cat/, dog/), one nested deeper, and two files that are not images."""
    root = tmp_path / "images"
    shutil.copytree(folder / "test", root)
    (root / "dog" / "more").mkdir()
    shutil.move(root / "dog" / "000.png", root / "dog" / "more" / "000.png")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    return root


def by_hand(path, mean, std, resized=18, size=16):
    """The evaluation view written out: shorter side to ``resized`` (bicubic, antialiased), centre size², mean/std."""
    image = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    image = TF.resize(image, [resized], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    image = TF.center_crop(image, [size, size]).float() / 255
    return ((image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


def test_embed_has_one_row_per_readable_image_with_the_encoders_pooled_features(pretrained, images, tmp_path):
    out = tmp_path / "features.safetensors"
    with pytest.warns(UserWarning, match="embed skipped 2 unreadable image") as caught:
        result = api.embed(pretrained, str(images), out)
    assert len(caught) == 1   # one warning, not one per file
    features, paths, metadata = read_embeddings(out)
    expected = sorted(str(p.relative_to(images)) for p in images.rglob("*.png") if p.name != "broken.png")
    assert sorted(paths) == expected and len(paths) == 12 and result["rows"] == 12
    assert result["skipped"] == 2 and sorted(name.rsplit("/", 1)[-1] for name in result["skipped_examples"]) == \
        ["broken.png", "empty.jpg"]
    assert features.shape == (12, 32) and features.dtype == torch.float32 and metadata["skipped"] == 2
    # the folder view of a folder-pretrained run: 16 / 18 (resize to 18, centre crop 16), the run's data mean/std
    dataset = json.loads((pretrained / "summary.json").read_text())["dataset"]
    assert metadata["crop_pct"] == pytest.approx(16 / 18) and metadata["mean"] == pytest.approx(dataset["mean"])
    encoder = load_run(pretrained).method.encoder
    for row in (0, 5, paths.index("dog/more/000.png")):
        with torch.no_grad():
            tokens = encoder.forward_features(by_hand(images / paths[row], dataset["mean"], dataset["std"]))
        assert torch.allclose(features[row], tokens[0, 1:].mean(0), atol=1e-5)
        if row == 0:
            cls_token, patch_tokens = tokens[0, 0], tokens[0, 1:].flatten()
    # the probe's other poolings: same rows, same order
    for pool, width, first in (("cls", 32, cls_token), ("tokens", 16 * 32, patch_tokens)):
        other = tmp_path / f"{pool}.safetensors"
        api.embed(pretrained, str(images), other, pool=pool, batch_size=5)   # batches of 5: 3 batches with a rest
        pooled, pooled_paths, _ = read_embeddings(other)
        assert pooled_paths == paths and pooled.shape == (12, width)
        assert torch.allclose(pooled[0], first, atol=1e-5)


def test_embed_of_a_finetuning_gives_the_heads_input(finetuned, images, tmp_path):
    out = tmp_path / "tuned.safetensors"
    api.embed(finetuned, str(images), out, pool="mean")
    features, paths, metadata = read_embeddings(out)
    assert metadata["kind"] == "finetune" and features.shape == (12, 32)
    classifier = load_finetuned(finetuned).classifier
    predictions = tmp_path / "predictions.csv"
    api.predict(finetuned, str(images), predictions)   # default top-k: both classes (min(5, 2))
    rows = read_rows(predictions)
    assert [row["image"] for row in rows] == [str(images / path) for path in paths]
    with torch.no_grad():
        probabilities = classifier.head(features).softmax(-1)   # fc_norm is inside the features already
    names = load_finetuned(finetuned).results["class_names"]
    for row, probability in zip(rows, probabilities):
        assert {row["class_1"]: float(row["probability_1"]), row["class_2"]: float(row["probability_2"])} == \
            pytest.approx(dict(zip(names, probability.tolist())), abs=2e-6)


def test_embed_refuses_an_existing_file_an_empty_folder_and_a_bad_pool(pretrained, images, tmp_path, capsys):
    out = tmp_path / "features.safetensors"
    out.write_bytes(b"mine")
    assert main(["embed", str(pretrained), "--data", str(images), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["embed", str(pretrained), "--data", str(images), "--out", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("embedded 12 images (32-d mean features)")
    assert printed[1].startswith("skipped 2 unreadable image(s): ") and "broken.png" in printed[1]
    assert read_embeddings(out)[0].shape == (12, 32)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]   # written beside, renamed into place
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["embed", str(pretrained), "--data", str(empty), "--out", str(tmp_path / "e.safetensors")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("leanmim: error: no image files found")
    assert main(["embed", str(pretrained), "--data", str(images), "--out", str(tmp_path / "x.npy")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    with pytest.raises(Exception, match="unknown --pool"):
        api.embed(pretrained, str(images), tmp_path / "p.safetensors", pool="max")


def test_embed_reads_an_export_as_its_run_and_says_what_a_bare_weights_file_does_not_state(pretrained, images,
                                                                                           tmp_path):
    """An export carries its preprocessing (timm pretrained_cfg): embedding it equals embedding its run. Weights that
    state nothing (a bare timm state dict) are embedded with the images' own mean/std and a 0.875 crop, said once."""
    from safetensors.torch import load_file, save_file

    from leanmim.data.common import channel_stats, load_image
    from leanmim.eval.embed import EmbedInput, measured_stats
    from leanmim.eval.predict import image_files

    exported = tmp_path / "encoder.safetensors"
    api.export(pretrained, exported)
    with pytest.warns(UserWarning, match="--init-from: loaded"):
        api.embed(exported, str(images), tmp_path / "from-export.safetensors")
    api.embed(pretrained, str(images), tmp_path / "from-run.safetensors")
    from_export, paths_export, meta_export = read_embeddings(tmp_path / "from-export.safetensors")
    from_run, paths_run, meta_run = read_embeddings(tmp_path / "from-run.safetensors")
    assert paths_export == paths_run and meta_export["kind"] == "weights"
    assert meta_export["mean"] == pytest.approx(meta_run["mean"]) and meta_export["crop_pct"] == meta_run["crop_pct"]
    assert torch.allclose(from_export, from_run, atol=1e-5)

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(exported)), str(bare))          # the same tensors, no metadata
    with pytest.warns(UserWarning, match="does not state its mean/std and crop: embed uses the mean/std of the "
                                         "images embedded and a 0.875 centre crop"):
        api.embed(bare, str(images), tmp_path / "from-bare.safetensors")
    _, _, meta_bare = read_embeddings(tmp_path / "from-bare.safetensors")
    files = image_files(images)
    assert meta_bare["crop_pct"] == 0.875
    assert meta_bare["mean"] == pytest.approx(measured_stats(EmbedInput(images, 3).stats_decoders(), 3, 16, 0.875)[0])
    readable = [load_image(name, 3) for name in files if not name.endswith(("broken.png", "empty.jpg"))]
    # measured on the views (resize + crop), close to the images' own statistics
    whole = channel_stats(torch.stack([TF.center_crop(TF.resize(image, [18]), [16, 16]) for image in readable]))
    assert meta_bare["mean"] == pytest.approx(list(whole[0]), abs=0.02)


def test_embed_reads_shards_as_it_reads_their_folder(pretrained, folder, tmp_path):
    """Shards hold the image files' own bytes: each sample's row equals its file's row from the folder, named
    SHARD:KEY in the shards' order."""
    from leanmim.data import write_shards

    shards = tmp_path / "shards"
    write_shards(str(folder), shards, shard_size=7)
    from_shards = api.embed(pretrained, str(shards), tmp_path / "s.safetensors")
    api.embed(pretrained, str(folder), tmp_path / "f.safetensors")
    shard_rows, shard_names, meta = read_embeddings(tmp_path / "s.safetensors")
    folder_rows, folder_paths, _ = read_embeddings(tmp_path / "f.safetensors")
    assert from_shards["rows"] == len(folder_paths) == len(shard_names) and meta["skipped"] == 0
    assert all(name.split(":")[0].endswith(".tar") for name in shard_names)
    by_stem = {path.rsplit(".", 1)[0]: row for path, row in zip(folder_paths, folder_rows)}
    for name, row in zip(shard_names, shard_rows):
        shard, key = name.split(":", 1)            # e.g. train-000001.tar, cat/003: the file train/cat/003.png
        assert torch.allclose(row, by_stem[f"{shard.split('-')[0]}/{key}"], atol=1e-5), name
