"""Fine-tuning (MAE protocol): learning, exact resumption, any method's encoder, token compression, export."""

import json

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import DropPath

from conftest import tiny_model, tiny_run_config
from leanmim import api
from leanmim.cli import main
from leanmim.engine import pretrain
from leanmim.export import timm_create_kwargs
from leanmim.checkpoint import load_run
from leanmim.finetune import (Classifier, initial_encoder, layer_decay_groups, load_finetuned, prepare_encoder,
                               supports_token_drop)
from leanmim.methods import METHODS, build_method

FAST = dict(batch_size=32, lr=3e-3, precision="32", progress_bar=False, log_every_steps=1)
UNINTERRUPTED = dict(epochs=4, drop_path=0.0, **FAST)


pytestmark = pytest.mark.usefixtures("single_thread")


class StopAfterEpoch(L.Callback):
    """Simulates an interrupted run: stops at the end of epoch ``epochs``."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finetune") / "run"
    pretrain(tiny_run_config(tiny_data, run, epochs=2))
    return run


@pytest.fixture(scope="module")
def finetuned(pretrained):
    """4 epochs of fine-tuning into the default output directory RUN_DIR/finetune. Without drop path every random
    draw (data order, crops, flips) is seeded per step, so a resumed run must equal this one exactly."""
    return api.finetune(pretrained, **UNINTERRUPTED)


def test_finetuning_beats_chance_and_writes_results(pretrained, finetuned):
    out = pretrained / "finetune"
    assert finetuned["out"] == str(out) and finetuned["global_step"] == 4 * 4   # 128 images / batch 32
    assert [entry["epoch"] for entry in finetuned["history"]] == [1, 2, 3, 4]
    assert finetuned["best_top1"] >= 0.9 > 0.5          # 2 balanced-ish classes: chance is about 0.5
    assert finetuned["best_top1"] == max(entry["test_top1"] for entry in finetuned["history"])
    assert finetuned["last_top1"] == finetuned["history"][-1]["test_top1"]
    written = json.loads((out / "finetune.json").read_text())
    assert written["best_top1"] == finetuned["best_top1"] and written["history"] == finetuned["history"]
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["finetune"]["best_top1"] == finetuned["best_top1"]
    # the checkpoint holds the classifier only (no decoder) and the results
    loaded = load_finetuned(out)
    assert loaded.results["history"] == finetuned["history"] and loaded.config.method == "mae"
    assert loaded.classifier.head.out_features == 2


def test_resumed_finetuning_equals_uninterrupted(pretrained, finetuned, tmp_path):
    first = api.finetune(pretrained, out=str(tmp_path / "split"), callbacks=[StopAfterEpoch(2)], **UNINTERRUPTED)
    assert first["global_step"] == 8 and len(first["history"]) == 2
    resumed = api.finetune(pretrained, out=str(tmp_path / "split"), **UNINTERRUPTED)
    assert resumed["resumed_from"] and resumed["global_step"] == 16
    assert resumed["history"] == finetuned["history"]
    whole = load_finetuned(pretrained / "finetune").classifier.state_dict()
    split = load_finetuned(tmp_path / "split").classifier.state_dict()
    for key, value in whole.items():
        assert torch.equal(value, split[key]), key


def test_from_scratch_starts_from_a_fresh_seeded_init_not_the_pretrained_weights(pretrained):
    loaded = load_run(pretrained)
    pretrained_weights = loaded.method.encoder.state_dict()
    assert initial_encoder(loaded, from_scratch=False, seed=0) is loaded.method.encoder
    torch.manual_seed(3)
    fresh = build_method(loaded.config.method, loaded.config.model, loaded.config.options).encoder.state_dict()
    scratch = initial_encoder(loaded, from_scratch=True, seed=3).state_dict()
    assert scratch.keys() == pretrained_weights.keys()
    assert all(torch.equal(scratch[key], fresh[key]) for key in scratch)           # exactly the method's own init
    changed = [key for key in scratch if not torch.equal(scratch[key], pretrained_weights[key])]
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_encoder_becomes_a_classifier(name):
    model = tiny_model(img_size=28)          # a 7×7 grid fits every method's default options
    encoder = prepare_encoder(build_method(name, model, {}).encoder, drop_path=0.2)
    rates = [block.drop_path2.drop_prob if isinstance(block.drop_path2, DropPath) else 0.0 for block in encoder.blocks]
    assert rates == pytest.approx([0.0, 0.2]) and isinstance(encoder.norm, torch.nn.Identity)
    classifier = Classifier(encoder, num_classes=3).train()
    images = torch.randn(4, 1, 28, 28)
    logits = classifier(images)
    assert logits.shape == (4, 3)
    logits.square().sum().backward()
    assert encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_layer_decay_scales_and_weight_decay():
    encoder = prepare_encoder(build_method("mae", tiny_model(depth=3), {}).encoder, 0.0)
    groups = layer_decay_groups(Classifier(encoder, 2), weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in groups:
        for parameter in group["params"]:
            scale_of[id(parameter)] = (group["lr_scale"], group["weight_decay"])
    assert scale_of[id(encoder.patch_embed.proj.weight)] == (0.5 ** 4, 0.05)      # layer 0 of depth 3
    assert scale_of[id(encoder.cls_token)] == (0.5 ** 4, 0.0)
    assert scale_of[id(encoder.blocks[1].mlp.fc1.weight)] == (0.5 ** 2, 0.05)      # layer 2
    assert scale_of[id(encoder.blocks[1].norm1.weight)] == (0.5 ** 2, 0.0)
    head = Classifier(encoder, 2)
    groups = layer_decay_groups(head, 0.05, 0.5)
    assert {(g["lr_scale"], g["weight_decay"]) for g in groups if any(p is head.head.weight for p in g["params"])} \
        == {(1.0, 0.05)}
    assert sum(len(g["params"]) for g in groups) == len(list(head.parameters()))


def test_token_compression_at_drop_zero_equals_plain_encoder():
    encoder = prepare_encoder(build_method("mae", tiny_model(depth=4), {}).encoder, 0.0)
    if not supports_token_drop(encoder):
        pytest.skip("the encoder has no token compression yet")
    torch.manual_seed(0)
    plain = Classifier(encoder, 2).eval()
    # 16 patches × 0.01 drops ⌊0.16⌋ = 0 tokens per stage: the compression path, nothing dropped
    nothing_dropped = Classifier(encoder, 2, token_drop=0.01).eval()
    nothing_dropped.load_state_dict(plain.state_dict())
    dropping = Classifier(encoder, 2, token_drop=0.5).eval()
    dropping.load_state_dict(plain.state_dict())
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain(images), nothing_dropped(images), atol=1e-6)
        assert not torch.allclose(plain(images), dropping(images), atol=1e-4)


def test_export_of_a_finetuned_classifier_loads_in_timm(pretrained, finetuned, tmp_path, capsys):
    out = tmp_path / "classifier.safetensors"
    assert main(["export", str(pretrained / "finetune"), "--out", str(out)]) == 0, capsys.readouterr().err
    state = load_file(str(out))
    assert "head.weight" in state and "fc_norm.weight" in state and "norm.weight" not in state
    loaded = load_finetuned(pretrained / "finetune")
    kwargs = timm_create_kwargs(loaded.config.model)
    model = timm.create_model(kwargs.pop("model_name"), pretrained=False, num_classes=2, global_pool="avg", **kwargs)
    model.load_state_dict(state, strict=True)
    model.eval()
    images = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(images), loaded.classifier(images), atol=1e-5)


def test_cli_finetune_and_one_line_errors(pretrained, finetuned, tmp_path, capsys):
    token_drop = supports_token_drop(build_method("mae", tiny_model(), {}).encoder)
    code = main(["finetune", str(pretrained), "--out", str(tmp_path / "cli"), "--epochs", "1", "--batch-size", "32",
                 "--precision", "32", "--no-progress-bar", "--json", *(["--token-drop", "0.25"] if token_drop else [])])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out[captured.out.index("{"):])
    assert result["epochs_completed"] == 1 and 0.0 <= result["last_top1"] <= 1.0
    if token_drop:
        assert result["token_drop"] == 0.25 and load_finetuned(tmp_path / "cli").classifier.token_drop == 0.25
    for args, fragment in [(["finetune", str(pretrained / "finetune")], "is a fine-tuning result"),
                           (["finetune", str(pretrained), "--layer-decay", "0"], "layer_decay must lie in (0, 1]"),
                           (["finetune", str(pretrained), "--token-drop", "1.5"], "token_drop must lie in [0, 1)"),
                           (["finetune", str(tmp_path / "nothing")], "does not exist")]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("leanmim: error: ") and fragment in err and err.count("\n") == 1, err
