"""Using a model: predict (class names, top-k, the fine-tuning's own preprocessing), the fine-tuned timm export with
its labels and preprocessing, and status / runs of running, interrupted and finished runs (one log per run)."""

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model, tiny_run_config
from test_finetune import StopAfterEpoch
from leanmim import api
from leanmim.cli import main
from leanmim.train.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("single_thread")
CLASSES = ["cat", "dog"]
FAST = dict(batch_size=16, lr=3e-3, precision="32", progress_bar=False, log_every_steps=1, drop_path=0.0)



def make_folder(root, per_class=(40, 12), seed=0):
    """DIR/{train,test}/{cat,dog}/*.png, RGB 20×24 (not square: the centre crop matters): a bright square
    top-left (cat) or bottom-right (dog) over noise."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                picture = rng.integers(0, 60, (20, 24, 3))
                offset = (3, 3) if label == 0 else (10, 14)
                picture[offset[0]:offset[0] + 7, offset[1]:offset[1] + 7] += 180
                Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("use") / "photos")


@pytest.fixture(scope="module")
def pretrained(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("use-run") / "run"
    config = tiny_run_config(folder, run, epochs=1, batch_size=16)
    pretrain(dataclasses.replace(config, model=tiny_model(in_chans=3)))
    return run


@pytest.fixture(scope="module")
def finetuned(pretrained):
    api.finetune(pretrained, epochs=8, val_fraction=0.25, **FAST)
    return pretrained / "finetune"


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_names_the_folders_classes_and_skips_bad_images(finetuned, folder, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(folder / "test", images)
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "predictions.csv"
    result = api.predict(finetuned, str(images), out, top_k=2)
    rows = read_rows(out)
    assert result["classes"] == CLASSES and result["skipped"] == 1 and result["rows"] == len(rows) == 24
    assert json.loads((finetuned / "finetune.json").read_text())["class_names"] == CLASSES
    for row in rows:
        assert {row["class_1"], row["class_2"]} == set(CLASSES)
        assert float(row["probability_1"]) >= float(row["probability_2"])
        assert float(row["probability_1"]) + float(row["probability_2"]) == pytest.approx(1, abs=1e-5)
    truth = [os.path.basename(os.path.dirname(row["image"])) for row in rows]
    correct = sum(row["class_1"] == name for row, name in zip(rows, truth))
    recorded = json.loads((finetuned / "finetune.json").read_text())["selected_test_top1"]
    assert correct / len(rows) == pytest.approx(recorded, abs=0.09) and correct >= 20                      # the classes are told apart: names are attached to the right labels
    assert main(["predict", str(finetuned), "--data", str(images), "--out", str(out)]) == 2    # no --overwrite
    # the default --top-k is min(5, classes): both classes here, not an error
    assert main(["predict", str(finetuned), "--data", str(images), "--out", str(out), "--overwrite"]) == 0
    assert list(read_rows(out)[0]) == ["image", "class_1", "probability_1", "class_2", "probability_2"]
    assert main(["predict", str(finetuned), "--data", str(images), "--out", str(tmp_path / "p.csv"), "--top-k", "3"]) == 2


def test_timm_export_of_a_finetuning_predicts_as_leanmim_with_timms_own_preprocessing(finetuned, folder, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    out = tmp_path / "export"
    assert main(["export", str(finetuned), "--out", str(out)]) == 0
    assert (out / "README.md").is_file() and "cat, dog" in (out / "README.md").read_text()
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == CLASSES and model.num_classes == 2
    data_config = resolve_data_config({}, model=model)
    transform = create_transform(**data_config)
    assert data_config["crop_pct"] * 18 == pytest.approx(16) and data_config["crop_mode"] == "center"
    predictions = tmp_path / "leanmim.csv"
    api.predict(finetuned, str(folder / "test"), predictions, top_k=2)
    for row in read_rows(predictions):
        with torch.no_grad():
            probabilities = model(transform(Image.open(row["image"]).convert("RGB"))[None]).softmax(-1)[0]
        ours = {row["class_1"]: float(row["probability_1"]), row["class_2"]: float(row["probability_2"])}
        # PIL's and torch's bicubic resize differ by a grey level here and there: close, not bit-equal
        assert probabilities.tolist() == pytest.approx([ours[name] for name in CLASSES], abs=0.03)


@pytest.fixture(scope="module")
def finetuned_cls(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("use-cls") / "finetune-cls"
    api.finetune(pretrained, out=str(out), pool="cls", epochs=3, val_fraction=0.25, **FAST)
    return out


@pytest.mark.parametrize("pool, architecture", [("mean", "BeitForImageClassification"),
                                                ("cls", "ViTForImageClassification")])
def test_hf_export_of_a_finetuning_predicts_as_leanmim_with_its_own_preprocessor(pool, architecture, request, folder,
                                                                                tmp_path):
    transformers = pytest.importorskip("transformers")
    from leanmim.data import load_image
    from leanmim.eval.predict import eval_view
    from leanmim.weights import load_finetuned

    tuned = request.getfixturevalue("finetuned" if pool == "mean" else "finetuned_cls")
    out = tmp_path / "hf"
    assert main(["export", str(tuned), "--out", str(out), "--format", "hf"]) == 0
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]                       # built beside, renamed: nothing left
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    card = (out / "README.md").read_text()
    assert "AutoModelForImageClassification" in card and "cat, dog" in card
    model = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    assert type(model).__name__ == architecture
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.label2id == {"cat": 0, "dog": 1}
    loaded = load_finetuned(tuned)
    stats = json.loads((tuned / "finetune.json").read_text())["data_stats"]
    assert processor.image_mean == pytest.approx(stats["mean"]) and processor.crop_size["height"] == 16
    predictions = tmp_path / "leanmim.csv"
    api.predict(tuned, str(folder / "test"), predictions)
    rows = read_rows(predictions)[::3]
    pixels = processor(images=[Image.open(row["image"]).convert("RGB") for row in rows], return_tensors="pt")
    pixels = pixels["pixel_values"]
    ours = torch.stack([eval_view(load_image(row["image"], 3), 16, loaded.results["eval_crop_pct"], stats["mean"],
                                  stats["std"]) for row in rows])
    # transformers 5 resizes with torchvision as leanmim does (4.x: with PIL, a grey level apart here and there)
    assert torch.allclose(pixels, ours, atol=1e-5 if int(transformers.__version__.split(".")[0]) >= 5 else 0.1)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        assert torch.allclose(logits, loaded.classifier(pixels), atol=1e-5)     # the same classifier, fp32 rounding
    for row, probabilities in zip(rows, logits.softmax(-1).tolist()):
        recorded = {row["class_1"]: float(row["probability_1"]), row["class_2"]: float(row["probability_2"])}
        assert [recorded[name] for name in CLASSES] == pytest.approx(probabilities, abs=1e-5)


def test_hf_export_of_a_pretraining_carries_its_preprocessing_and_card(pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", str(pretrained), "--out", str(out), "--format", "hf"]) == 0
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    dataset = json.loads((pretrained / "summary.json").read_text())["dataset"]
    assert processor.image_mean == pytest.approx(dataset["mean"]) and processor.image_std == pytest.approx(dataset["std"])
    assert processor.size["shortest_edge"] == 18 and processor.crop_size == {"height": 16, "width": 16}  # folder view
    assert "Pretrained encoder" in (out / "README.md").read_text()
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text()) \
        if main(["export", str(pretrained), "--out", str(tmp_path / "timm")]) == 0 else {}
    assert timm_config["pretrained_cfg"]["crop_pct"] * 18 == pytest.approx(16)   # timm's view is the same one


def test_hf_export_of_a_tokens_finetuning_is_refused_with_the_alternative(pretrained, tmp_path, capsys):
    pytest.importorskip("transformers")
    tuned = tmp_path / "tokens"
    api.finetune(pretrained, out=str(tuned), pool="tokens", epochs=1, val_fraction=0.25, **FAST)
    assert main(["export", str(tuned), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    error = capsys.readouterr().err.strip()
    assert "no transformers counterpart" in error and "--format timm" in error and not (tmp_path / "hf").exists()


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_status_of_finished_interrupted_and_running_runs(pretrained, finetuned, tmp_path, capsys):
    finished = api.status(pretrained)
    assert finished["state"] == "finished" and finished["kind"] == "pretrain" and finished["method"] == "mae"
    assert finished["step"] == finished["total_steps"] > 0 and finished["last_checkpoint"].endswith(".ckpt")
    assert finished["finetunings"] == [str(finetuned)] and finished["last_loss"] is not None
    tuned = api.status(finetuned)
    assert tuned["state"] == "finished" and tuned["kind"] == "finetune" and tuned["best_checkpoint"]

    stopped = tmp_path / "stopped"
    api.finetune(pretrained, out=str(stopped), epochs=3, val_fraction=0.25, callbacks=[StopAfterEpoch(1)], **FAST)
    interrupted = api.status(stopped)
    assert interrupted["state"] == "interrupted" and not interrupted["finished"]
    assert 0 < interrupted["step"] < interrupted["total_steps"]
    summary = json.loads((stopped / "summary.json").read_text())["progress"]
    assert summary["state"] == "stopped" and summary["pid"] == os.getpid()
    # resumed: one CSV log, appended to, no version_N directories
    api.finetune(pretrained, out=str(stopped), epochs=3, val_fraction=0.25, **FAST)
    assert (stopped / "logs" / "metrics.csv").is_file() and not list((stopped / "logs").glob("version_*"))

    running = tmp_path / "running"
    shutil.copytree(pretrained, running)
    shutil.rmtree(running / "finetune")
    summary = json.loads((running / "summary.json").read_text())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        summary["progress"] = {**summary["progress"], "state": "running", "pid": sleeper.pid, "step": 1,
                               "total_steps": 100, "steps_per_second": 2.0}
        (running / "summary.json").write_text(json.dumps(summary))
        ckpt = torch.load(running / "checkpoints/last.ckpt", weights_only=True)
        ckpt["leanmim"]["total_steps"], ckpt["global_step"] = 100, 1
        torch.save(ckpt, running / "checkpoints/last.ckpt")
        for other in (running / "checkpoints").glob("epoch*.ckpt"):
            other.unlink()
        status = api.status(running)
        assert status["state"] == "running" and status["eta_seconds"] == 50
    finally:
        sleeper.kill()
        sleeper.wait()
    assert api.status(running)["state"] == "interrupted"     # its process is gone
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "interrupted" in lines[0] or "interrupted" in lines[1]
    assert main(["status", str(tmp_path / "nothing")]) == 2
