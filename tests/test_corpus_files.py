"""Issue 29 §4–§5, files a user's disk can hold: damaged records, JSON that is not JSON, a head count that is not a
number, a shard directory with the user's own files in it. Each gets one line that names the file, or is repaired
with a warning; nothing a user owns is deleted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from leanmim.config import ConfigError
from leanmim.data import DataError, write_shards
from leanmim.train.run import write_summary
from leanmim.weights import read_weights


def one_line(argv: list[str], cwd: Path) -> str:
    completed = subprocess.run([sys.executable, "-m", "leanmim", *argv], cwd=cwd, capture_output=True, text=True,
                               timeout=120)
    errors = [line for line in completed.stderr.splitlines() if line.startswith("leanmim: error")]
    assert completed.returncode == 2 and len(errors) == 1 and "Traceback" not in completed.stderr, completed.stderr
    return errors[0]


def tiny_vit_state() -> dict[str, torch.Tensor]:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0)
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def test_a_transformers_config_that_is_not_json_is_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_attention_heads": 3,')  # truncated
    save_file({"x": torch.zeros(1)}, str(model / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"config.json' is not valid JSON"):
        read_weights(model)
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        read_weights(model)
    line = one_line(["pretrain", "--init-from", str(model), "--data", "fashion-mnist", "--patch-size", "4", "--out",
                     str(tmp_path / "r")],
                    tmp_path)
    assert "config.json" in line


@pytest.mark.parametrize("stated", ["abc", "0", "-3", "2.5"])
def test_a_head_count_that_is_not_a_positive_whole_number_is_refused(tmp_path, stated):
    weights = tmp_path / "w.safetensors"
    save_file(tiny_vit_state(), str(weights), metadata={"num_heads": stated})
    with pytest.raises(ConfigError, match=rf"num_heads={stated!r}, not a positive whole number"):
        read_weights(weights)
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": stated, "hidden_size": 192}))
    save_file({"x": torch.zeros(1)}, str(model / "model.safetensors"))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        read_weights(model)


def test_a_stated_head_count_is_read(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(tiny_vit_state(), str(weights), metadata={"num_heads": "3"})
    assert read_weights(weights).config["num_heads"] == 3


def test_a_damaged_summary_is_rewritten_with_a_warning(tmp_path):
    (tmp_path / "summary.json").write_text('{"probes": {"a": ')  # a crash elsewhere, or an editor
    with pytest.warns(UserWarning, match="not a JSON object"):
        summary = write_summary(tmp_path, {"probes": {"b": 1}})
    assert summary == {"probes": {"b": 1}} == json.loads((tmp_path / "summary.json").read_text())
    summary = write_summary(tmp_path, {"final_loss": float("nan")})  # strict JSON: NaN is written as null
    assert json.loads((tmp_path / "summary.json").read_text()) == {"probes": {"b": 1}, "final_loss": None}


def make_folder(root: Path, count: int = 6) -> Path:
    root.mkdir(parents=True)
    for index in range(count):
        Image.new("L", (12, 12), color=index * 30).save(root / f"{index}.png")
    return root


def test_shard_overwrite_replaces_only_what_its_manifest_lists(tmp_path):
    images, out = make_folder(tmp_path / "images"), tmp_path / "shards"
    write_shards(str(images), out, shard_size=2)
    listed = sorted(p.name for p in out.glob("*.tar"))
    assert len(listed) == 3
    (out / "mine-000000.tar").write_bytes(b"the user's own archive")   # matches the shard name pattern
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_shards(str(images), out, shard_size=3)
    manifest = write_shards(str(images), out, shard_size=3, overwrite=True)
    assert (out / "mine-000000.tar").read_bytes() == b"the user's own archive" and (out / "notes.txt").exists()
    names = {shard["name"] for shard in manifest["splits"]["train"]["shards"]}
    assert len(names) == 2 and sorted(p.name for p in out.glob("train-*.tar")) == sorted(names)


def test_shard_overwrite_refuses_a_directory_it_did_not_write(tmp_path):
    images, out = make_folder(tmp_path / "images"), tmp_path / "theirs"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(DataError, match="no readable manifest.json"):
        write_shards(str(images), out, shard_size=2, overwrite=True)
    assert (out / "train-000000.tar").read_bytes() == b"someone else's"
    (out / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [{"name": "../escape.tar"}]}}}))
    with pytest.raises(DataError, match="outside --out"):
        write_shards(str(images), out, shard_size=2, overwrite=True)


def test_an_interrupt_saves_its_resume_point_without_lightnings_weights_only_line(tmp_path):
    import logging

    from conftest import make_tiny_idx_dataset
    from test_cluster_corpus import interrupted_run

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    data = make_tiny_idx_dataset(tmp_path / "data")
    source = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")  # where Lightning says it
    kept, level = Keep(), source.level
    source.addHandler(kept)
    source.setLevel(logging.INFO)
    try:
        interrupted_run(data, tmp_path / "run")   # SIGTERM after step 1: last.ckpt written by the signal handler
    finally:
        source.removeHandler(kept)
        source.setLevel(level)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not [message for message in kept.messages if "weights_only" in message], kept.messages


def test_a_finetune_whose_loss_diverges_stops_before_a_checkpoint_holds_it(tiny_data, tmp_path, monkeypatch):
    from conftest import tiny_run_config
    from leanmim import api
    from leanmim.parts.classifier import Classifier
    from leanmim.train.pretrain import pretrain
    from leanmim.train.trainer import NonFiniteLossError

    run = tmp_path / "run"
    pretrain(tiny_run_config(tiny_data, run, max_steps=2))
    original = Classifier.forward
    calls = {"n": 0}

    def diverging(self, images):
        calls["n"] += 1
        logits = original(self, images)
        return logits * float("nan") if self.training and calls["n"] > 2 else logits   # the 3rd training step

    monkeypatch.setattr(Classifier, "forward", diverging)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*fine-tune's identity.*another --out"):
        api.finetune(run, out=str(tmp_path / "ft"), epochs=2, batch_size=32, precision="32", progress_bar=False)
    assert not list((tmp_path / "ft").glob("checkpoints/*.ckpt"))   # diverged in epoch 1: no checkpoint holds it


class Zeros:
    """A file of ``size`` zero bytes that is never held in memory (tarfile reads it in chunks)."""

    def __init__(self, size: int):
        self.left = size

    def read(self, count: int = -1) -> bytes:
        count = self.left if count is None or count < 0 else min(count, self.left)
        self.left -= count
        return bytes(count)


def test_a_tar_member_bomb_is_skipped_unread_and_counted(tmp_path):
    """A small .tar.gz holding a member that expands past the member limit (zeros compress ~1000:1): skipped from
    its tar header, without being read into memory; the shard's other samples are read; the skip is counted."""
    import io
    import resource
    import tarfile

    from leanmim.data.common import SkipLog
    from leanmim.data.shards import MAX_MEMBER_BYTES, raw_samples

    picture = io.BytesIO()
    Image.new("L", (8, 8), color=7).save(picture, format="PNG")
    shard = tmp_path / "bomb-000000.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1) as archive:
        for name, size, source in (("a.png", len(picture.getvalue()), io.BytesIO(picture.getvalue())),
                                   ("b.png", MAX_MEMBER_BYTES + 1, Zeros(MAX_MEMBER_BYTES + 1)),
                                   ("c.png", len(picture.getvalue()), io.BytesIO(picture.getvalue()))):
            info = tarfile.TarInfo(name)
            info.size = size
            archive.addfile(info, source)
    assert shard.stat().st_size < 2 << 20          # a few hundred kB on disk
    log = SkipLog()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.warns(UserWarning, match="member 'b.png' holds 256 MiB, over the 256 MiB"):
        keys = [sample["__key__"] for sample in raw_samples([str(shard)], log)]
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert keys == ["a", "c"] and log.names == [str(shard)]   # the other samples read; the skip counted
    assert grown_mib < 100, f"the process grew {grown_mib:.0f} MiB reading a shard with a skipped member"


@pytest.mark.parametrize("change, message", [
    (lambda m: m["stats"]["1"].update(std=[0.0]), "std of 0"),
    (lambda m: m.update(channels=2), "channels 2 is not 1 or 3"),
    (lambda m: m.update(img_size=-4), "img_size -4"),
    (lambda m: m["splits"].update(validation=m["splits"]["train"]), "split 'validation'"),
    (lambda m: m["splits"]["train"]["shards"][0].update(name="../x.tar"), "not a file name"),
    (lambda m: m["splits"]["train"].update(count=10 ** 6), "not the sum of its shards"),
    (lambda m: m.update(classes=["a", "a"]), "distinct"),
])
def test_a_manifest_that_would_train_wrong_is_one_line(tmp_path, change, message):
    from leanmim.data import build_pretrain_data

    images, out = make_folder(tmp_path / "images"), tmp_path / "shards"
    (images / "train" / "x").mkdir(parents=True)
    (images / "test" / "x").mkdir(parents=True)
    for split in ("train", "test"):
        for index in range(3):
            Image.new("L", (12, 12), color=index * 60).save(images / split / "x" / f"{index}.png")
    write_shards(str(images), out, shard_size=2)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.setdefault("stats", {}).setdefault("1", {"mean": [0.5], "std": [0.2]})
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        build_pretrain_data(str(out), 8, 1)


def test_labels_beyond_the_manifests_classes_are_one_line(tmp_path):
    from leanmim.data import build_labelled_splits

    images, out = tmp_path / "images", tmp_path / "shards"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (images / split / name).mkdir(parents=True)
            for index in range(2):
                Image.new("L", (12, 12), color=index * 90).save(images / split / name / f"{index}.png")
    write_shards(str(images), out, shard_size=4)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["classes"] = ["a"]            # the samples say 0 and 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"has label 1, but the manifest names 1 classes"):
        build_labelled_splits(str(out), 8, 1)


def test_running_out_of_memory_on_the_cpu_is_one_line(monkeypatch, capsys):
    """torch's CPU allocator says "can't allocate memory" (not "out of memory", as CUDA does): e.g. `cost --depth
    99999999999` asked for 400 GB. Both are the out-of-memory line."""
    from leanmim import api
    from leanmim.cli import main

    for message in ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                    "tried to allocate 399999999996 bytes", "CUDA out of memory. Tried to allocate 2.00 GiB"):
        def failing(*_, **__):
            raise RuntimeError(message)

        monkeypatch.setattr(api, "cost", failing)
        assert main(["cost", "--model", "vit_tiny_patch16"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("leanmim")]
        assert lines == ["leanmim: error: out of memory: lower --batch-size or the model's size (--embed-dim, "
                         "--depth, --img-size), or --max-memory-gb for the data"]
