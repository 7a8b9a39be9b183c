"""Fine-tuning: selection on validation (the test split never chooses), exact resumption, label subsets, heads,
augmentation, EMA, any method's encoder, token compression, export of the selected checkpoint."""

import json
import shutil

import lightning as L
import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import DropPath

from conftest import tiny_model, tiny_run_config, write_idx
from leanmim import api
from leanmim.cli import main
from leanmim.data import BatchMIMAugment, read_idx
from leanmim.train.pretrain import pretrain
from leanmim.weights import timm_create_kwargs
from leanmim.weights import load_run
from leanmim.config import FinetuneConfig
from leanmim.parts.classifier import Classifier, initial_encoder, prepare_encoder, supports_token_drop
from leanmim.train.finetune_data import TrainAugment, labelled_data
from leanmim.train.optim import layer_decay_groups
from leanmim.weights import load_finetuned
from leanmim.methods import METHODS, build_method

FAST = dict(batch_size=32, lr=3e-3, precision="32", progress_bar=False, log_every_steps=1)
UNINTERRUPTED = dict(epochs=4, drop_path=0.0, **FAST)
STEPS_PER_EPOCH = 3          # 128 training images − 13 for validation = 115, batch 32


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


def classifier_state(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {key[len("classifier."):]: value for key, value in checkpoint["state_dict"].items()
            if key.startswith("classifier.")}


def test_finetuning_selects_on_validation_and_tests_once(pretrained, finetuned):
    out = pretrained / "finetune"
    assert finetuned["out"] == str(out) and finetuned["global_step"] == 4 * STEPS_PER_EPOCH
    assert (finetuned["num_train"], finetuned["num_val"], finetuned["num_test"]) == (115, 13, 64)
    history = finetuned["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3, 4]
    assert all(set(entry) == {"epoch", "step", "val_top1"} for entry in history)   # no test figure per epoch
    scores = [entry["val_top1"] for entry in history]
    assert finetuned["selected_epoch"] == scores.index(max(scores)) + 1             # the first best epoch
    assert finetuned["selected_val_top1"] == max(scores) and finetuned["last_val_top1"] == scores[-1]
    assert finetuned["selected_test_top1"] >= 0.9 > 0.5 and 0.5 < finetuned["last_test_top1"] <= 1.0
    assert "best_top1" not in finetuned and "last_top1" not in finetuned
    written = json.loads((out / "finetune.json").read_text())
    assert written["selected_test_top1"] == finetuned["selected_test_top1"] and written["history"] == history
    summary = json.loads((pretrained / "summary.json").read_text())["finetune"]
    assert summary["selected_test_top1"] == finetuned["selected_test_top1"] and "best_top1" not in summary
    # best.ckpt holds the selected epoch: its step and its weights; the directory loads as it
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["global_step"] == finetuned["selected_epoch"] * STEPS_PER_EPOCH
    assert best["leanmim"]["finetune"]["selected_epoch"] == finetuned["selected_epoch"]
    loaded = load_finetuned(out)
    assert loaded.checkpoint_path.name == "best.ckpt" and loaded.config.method == "mae"
    assert loaded.results["selected_epoch"] == finetuned["selected_epoch"]
    assert loaded.classifier.head.out_features == 2


def test_the_test_split_never_influences_selection(pretrained, finetuned, tiny_data, tmp_path):
    """The same data with every test label flipped (2 classes): identical validation history, selected epoch
    and selected weights; each test accuracy becomes exactly 1 − the original."""
    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_data, flipped)
    labels = read_idx(str(tiny_data / "t10k-labels-idx1-ubyte.gz"))
    write_idx(flipped / "t10k-labels-idx1-ubyte.gz", 1 - labels)
    other = api.finetune(pretrained, out=str(tmp_path / "ft"), data=str(flipped), **UNINTERRUPTED)
    assert other["history"] == finetuned["history"] and other["selected_epoch"] == finetuned["selected_epoch"]
    assert other["selected_test_top1"] == pytest.approx(1 - finetuned["selected_test_top1"], abs=1e-12)
    assert other["last_test_top1"] == pytest.approx(1 - finetuned["last_test_top1"], abs=1e-12)
    ours, theirs = classifier_state(pretrained / "finetune/checkpoints/best.ckpt"), \
        classifier_state(tmp_path / "ft/checkpoints/best.ckpt")
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_resumed_finetuning_equals_uninterrupted(pretrained, finetuned, tmp_path):
    first = api.finetune(pretrained, out=str(tmp_path / "split"), callbacks=[StopAfterEpoch(2)], **UNINTERRUPTED)
    assert first["global_step"] == 2 * STEPS_PER_EPOCH and len(first["history"]) == 2
    assert first["selected_test_top1"] is None and first["last_test_top1"] is None   # unfinished: no test yet
    resumed = api.finetune(pretrained, out=str(tmp_path / "split"), **UNINTERRUPTED)
    assert resumed["resumed_from"] and resumed["global_step"] == 4 * STEPS_PER_EPOCH
    assert resumed["history"] == finetuned["history"]
    for key in ("selected_epoch", "selected_test_top1", "last_test_top1"):
        assert resumed[key] == finetuned[key], key
    for name in ("last.ckpt", "best.ckpt"):
        whole = classifier_state(pretrained / "finetune/checkpoints" / name)
        split = classifier_state(tmp_path / "split/checkpoints" / name)
        for key, value in whole.items():
            assert torch.equal(value, split[key]), (name, key)


def test_export_writes_the_selected_checkpoint(pretrained, finetuned, tmp_path, capsys):
    out = tmp_path / "classifier.safetensors"
    assert main(["export", str(pretrained / "finetune"), "--out", str(out)]) == 0, capsys.readouterr().err
    state = load_file(str(out))
    assert "head.weight" in state and "fc_norm.weight" in state and "norm.weight" not in state
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["checkpoint"] == "best.ckpt" and metadata["global_pool"] == "avg"
    assert int(metadata["selected_epoch"]) == finetuned["selected_epoch"]
    best = classifier_state(pretrained / "finetune/checkpoints/best.ckpt")
    last = classifier_state(pretrained / "finetune/checkpoints/last.ckpt")
    assert torch.equal(state["head.weight"], best["head.weight"])
    assert finetuned["selected_epoch"] < 4 and not torch.equal(state["head.weight"], last["head.weight"])
    loaded = load_finetuned(pretrained / "finetune")
    kwargs = timm_create_kwargs(loaded.config.model)
    model = timm.create_model(kwargs.pop("model_name"), pretrained=False, num_classes=2, global_pool="avg", **kwargs)
    model.load_state_dict(state, strict=True)
    model.eval()
    images = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(images), loaded.classifier(images), atol=1e-5)


def test_label_subsets_train_on_exact_counts(pretrained, tmp_path):
    result = api.finetune(pretrained, out=str(tmp_path / "few"), labels_per_class=20, epochs=1, **FAST)
    assert (result["num_train"], result["num_val"]) == (40, 13) and result["global_step"] == 1
    _, subsets = labelled_data(str(load_run(pretrained).config.data.path), 16, 1, 0.1, 0, 20, None)
    labels = torch.tensor([label for _, label in subsets.train])
    assert torch.bincount(labels).tolist() == [20, 20]


def test_validation_every_n_epochs_and_after_the_last(pretrained, tmp_path):
    result = api.finetune(pretrained, out=str(tmp_path / "sparse"), val_every_epochs=2, **{**UNINTERRUPTED, "epochs": 3})
    assert [entry["epoch"] for entry in result["history"]] == [2, 3]
    best = torch.load(tmp_path / "sparse/checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert best["global_step"] == result["selected_epoch"] * STEPS_PER_EPOCH     # never an unvalidated epoch


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


def test_cls_and_tokens_heads_equal_hand_computation():
    torch.manual_seed(0)
    images = torch.randn(3, 1, 16, 16)
    for pool in ("cls", "tokens"):
        encoder = prepare_encoder(build_method("mae", tiny_model(), {}).encoder, 0.0, pool)
        assert isinstance(encoder.norm, torch.nn.LayerNorm)             # the pretrained final norm is kept
        classifier = Classifier(encoder, 5, pool=pool).eval()
        torch.nn.init.normal_(classifier.head.weight)
        with torch.no_grad():
            tokens = encoder.forward_features(images)                    # (3, 1 + 16, 32), after the final norm
            feature = tokens[:, 0] if pool == "cls" else torch.cat([tokens[:, 1 + i] for i in range(16)], dim=1)
            expected = feature @ classifier.head.weight.T + classifier.head.bias
            assert classifier.head.weight.shape == (5, 32 if pool == "cls" else 16 * 32)
            assert torch.allclose(classifier(images), expected, atol=1e-5)


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
    kept_norm = prepare_encoder(build_method("mae", tiny_model(depth=3), {}).encoder, 0.0, "cls")
    groups = layer_decay_groups(Classifier(kept_norm, 2, pool="cls"), 0.05, 0.5)
    assert [g["lr_scale"] for g in groups if any(p is kept_norm.norm.weight for p in g["params"])] == [1.0]


def mixing_augment(**options):
    crop = BatchMIMAugment(16, (0.5,), (0.25,), scale=(0.5, 1.0))
    return crop, TrainAugment(crop, num_classes=3, label_smoothing=0.1, **options)


def test_mixup_mixes_images_and_labels_with_one_drawn_lambda():
    crop, augment = mixing_augment(mixup=0.8)
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 2])
    mixed, targets = augment(images, labels, seed=11)
    cropped = crop(images, generator=torch.Generator().manual_seed(11))     # the same crops, unmixed
    off, on = 0.1 / 3, 1 - 0.1 + 0.1 / 3
    lam = (targets[0, 0].item() - off) / (on - off)                        # image 0 (class 0) meets class 2
    assert 0.0 < lam < 1.0
    smooth = torch.full((4, 3), off).scatter_(1, labels[:, None], on)
    assert torch.allclose(targets, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)
    assert torch.allclose(mixed, lam * cropped + (1 - lam) * cropped.flip(0), atol=1e-5)
    again, _ = augment(images, labels, seed=11)
    assert torch.equal(mixed, again)                                       # a function of the seed: exact resume


def test_random_erasing_and_policies_are_seeded_and_grayscale_safe():
    crop, augment = mixing_augment(random_erasing=1.0)
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    labels = torch.zeros(6, dtype=torch.long)
    erased, targets = augment(images, labels, seed=5)
    cropped = crop(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(targets, labels)
    changed = (erased != cropped)[:, 0]                                    # (6, 16, 16): one box per image
    for mask in changed:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) and mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].float().mean() > 0.95
        assert mask.sum() < 16 * 16
    state = torch.get_rng_state()
    for policy in ("randaugment", "trivialaugment"):
        crop, augment = mixing_augment(auto_augment=policy)
        first, _ = augment(images, labels, seed=3)
        assert first.shape == (6, 1, 16, 16) and torch.equal(first, augment(images, labels, seed=3)[0])
        assert not torch.equal(first, crop(images, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(torch.get_rng_state(), state)                       # the global generator is left as it was


def test_ema_weights_are_validated_selected_and_exported(pretrained, tmp_path):
    out = tmp_path / "ema"
    result = api.finetune(pretrained, out=str(out), ema_decay=0.9, pool="cls", **{**UNINTERRUPTED, "epochs": 2})
    best = torch.load(out / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    loaded = load_finetuned(out)
    assert torch.equal(loaded.classifier.head.weight, best["ema.module.head.weight"])
    assert not torch.equal(best["ema.module.head.weight"], best["classifier.head.weight"])
    splits, subsets = labelled_data(str(load_run(pretrained).config.data.path), 16, 1, 0.1, 0)
    images = torch.stack([image for image, _ in subsets.val])
    labels = torch.tensor([label for _, label in subsets.val])
    with torch.no_grad():
        top1 = (loaded.classifier(splits.batch_transform(images)).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(result["selected_val_top1"])
    exported = tmp_path / "ema.safetensors"
    api.export(out, exported)
    state = load_file(str(exported))
    assert torch.equal(state["head.weight"], best["ema.module.head.weight"]) and "fc_norm.weight" not in state
    kwargs = timm_create_kwargs(loaded.config.model)
    model = timm.create_model(kwargs.pop("model_name"), pretrained=False, num_classes=2, global_pool="token",
                              **kwargs).eval()
    model.load_state_dict(state, strict=True)
    test_images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(test_images), loaded.classifier(test_images), atol=1e-5)


def test_tokens_head_with_augmentations_exports_its_layout(pretrained, tmp_path):
    out = tmp_path / "tokens"
    api.finetune(pretrained, out=str(out), pool="tokens", mixup=0.8, cutmix=1.0, auto_augment="trivialaugment",
                 random_erasing=0.25, **{**UNINTERRUPTED, "epochs": 1})
    exported = tmp_path / "tokens.safetensors"
    api.export(out, exported)
    state = load_file(str(exported))
    with safe_open(str(exported), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["pool"] == "tokens" and metadata["global_pool"] == "" and metadata["num_classes"] == "0"
    weight, bias = state.pop("token_head.weight"), state.pop("token_head.bias")
    loaded = load_finetuned(out)
    kwargs = timm_create_kwargs(loaded.config.model)
    model = timm.create_model(kwargs.pop("model_name"), pretrained=False, num_classes=0, global_pool="",
                              **kwargs).eval()
    model.load_state_dict(state, strict=True)
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        by_hand = model.forward_features(images)[:, 1:].flatten(1) @ weight.T + bias
        assert torch.allclose(by_hand, loaded.classifier(images), atol=1e-5)


def test_token_compression_at_drop_zero_equals_plain_encoder():
    torch.manual_seed(0)   # the encoder's init too: the outcome must not depend on the tests run before
    encoder = prepare_encoder(build_method("mae", tiny_model(depth=4), {}).encoder, 0.0)
    if not supports_token_drop(encoder):
        pytest.skip("the encoder has no token compression yet")
    plain = Classifier(encoder, 2).eval()
    # 16 patches × 0.01 drops ⌊0.16⌋ = 0 tokens per stage: the compression path, nothing dropped
    nothing_dropped = Classifier(encoder, 2, token_drop=0.01).eval()
    nothing_dropped.load_state_dict(plain.state_dict())
    dropping = Classifier(encoder, 2, token_drop=0.5).eval()
    dropping.load_state_dict(plain.state_dict())
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain(images), nothing_dropped(images), atol=1e-6)
        # the pooled features (after fc_norm, of order 1), not the logits: the head's std-2e-5 init makes every
        # logit ~1e-4, below any tolerance that would tell "dropped" from "not dropped"
        assert torch.allclose(plain.forward_features(images), nothing_dropped.forward_features(images), atol=1e-5)
        assert not torch.allclose(plain.forward_features(images), dropping.forward_features(images), atol=1e-2)


def test_cli_finetune_and_one_line_errors(pretrained, finetuned, tmp_path, capsys):
    token_drop = supports_token_drop(build_method("mae", tiny_model(), {}).encoder)
    code = main(["finetune", str(pretrained), "--out", str(tmp_path / "cli"), "--epochs", "1", "--batch-size", "32",
                 "--precision", "32", "--no-progress-bar", "--json", *(["--token-drop", "0.25"] if token_drop else [])])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out[captured.out.index("{"):])
    assert result["epochs_completed"] == 1 and 0.0 <= result["last_test_top1"] <= 1.0
    if token_drop:
        assert result["token_drop"] == 0.25 and load_finetuned(tmp_path / "cli").classifier.token_drop == 0.25
    for args, fragment in [(["finetune", str(pretrained / "finetune")], "is a fine-tuning result"),
                           (["finetune", str(pretrained), "--layer-decay", "0"], "layer_decay must lie in (0, 1]"),
                           (["finetune", str(pretrained), "--token-drop", "1.5"], "token_drop must lie in [0, 1)"),
                           (["finetune", str(pretrained), "--val-fraction", "0"], "never on the test split"),
                           (["finetune", str(pretrained), "--labels-per-class", "5", "--label-fraction", "0.1"],
                            "not both"),
                           (["finetune", str(pretrained), "--mixup", "0.8", "--batch-size", "31"], "even --batch-size"),
                           (["finetune", str(pretrained), "--pool", "tokens", "--token-drop", "0.2"], "every patch"),
                           (["finetune", str(pretrained), "--pool", "max"], "is not one of"),
                           (["finetune", str(pretrained), "--out", str(tmp_path / "many"), "--labels-per-class", "100"],
                            "exceeds the"),
                           (["finetune", str(tmp_path / "nothing")], "does not exist")]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("leanmim: error: ") and fragment in err and err.count("\n") == 1, err


def test_a_stopped_pretraining_is_flagged_by_probe_and_finetune(pretrained, tiny_data, tmp_path, recwarn):
    """A pretraining stopped early is still usable, but never silently: probe and fine-tune warn and record it."""
    finished = load_run(pretrained)
    checkpoint = torch.load(finished.checkpoint_path, map_location="cpu", weights_only=True)
    assert checkpoint["leanmim"]["total_steps"] == finished.global_step == 2 * 4    # 2 epochs of 128 // 32 batches
    assert finished.unfinished is None
    assert api.probe(pretrained, k=5, linear_epochs=1)["pretraining_finished"] is True

    stopped = tmp_path / "stopped"
    pretrain(tiny_run_config(tiny_data, stopped, epochs=2), callbacks=[StopAfterEpoch(1)])
    assert load_run(stopped).unfinished == "step 4 of its 8-step schedule"
    # a checkpoint from before total_steps was recorded: judged by the epochs Lightning's loop state ran
    legacy = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del legacy["leanmim"]["total_steps"]
    torch.save(legacy, tmp_path / "legacy.ckpt")
    assert load_run(tmp_path / "legacy.ckpt").unfinished == "epoch 1 of 2 (step 4)"

    recwarn.clear()
    with pytest.warns(UserWarning, match=r"the probe uses .*a pretraining that stopped at step 4 of its 8-step"):
        assert api.probe(stopped, k=5, linear_epochs=1)["pretraining_finished"] is False
    with pytest.warns(UserWarning, match=r"the fine-tune uses .*stopped at step 4"):
        result = api.finetune(stopped, out=str(tmp_path / "ft"), epochs=1, **FAST)
    assert result["source_pretraining_finished"] is False and result["source_global_step"] == 4
    recwarn.clear()
    scratch = api.finetune(stopped, out=str(tmp_path / "scratch"), epochs=1, from_scratch=True, **FAST)
    assert not [w for w in recwarn if "stopped at" in str(w.message)]            # no pretrained weights used
    assert scratch["source_global_step"] == 4


def test_evaluate_finetuned_reproduces_the_recorded_figures_and_averages_mirror_views(pretrained, finetuned):
    from leanmim.eval.finetuned import evaluate_finetuned

    out = pretrained / "finetune"
    assert evaluate_finetuned(out, "val") == finetuned["selected_val_top1"]       # the same split, weights, precision
    assert evaluate_finetuned(out, "test") == finetuned["selected_test_top1"]
    # hflip by hand: softmax(f(x)) + softmax(f(mirror x)), arg-max, over the carved validation split
    run = load_finetuned(out)
    splits, subsets = labelled_data(str(run.config.data.path), 16, 1, 0.1, 0)
    images, labels = zip(*(subsets.val[i] for i in range(len(subsets.val))))
    images, labels = splits.batch_transform(torch.stack(images)), torch.tensor(labels)
    with torch.no_grad():
        votes = run.classifier(images).softmax(-1) + run.classifier(images.flip(-1)).softmax(-1)
    assert evaluate_finetuned(out, "val", hflip=True) == pytest.approx((votes.argmax(1) == labels).float().mean().item())
    with pytest.raises(Exception, match="split must be 'val' or 'test'"):
        evaluate_finetuned(out, "train")


def make_mirror_classes(root):
    """Two classes that are each other's mirror image: a bright 6 × 6 square at columns 2-7 or at 8-13 (16 px)."""
    rng = np.random.default_rng(1)
    root.mkdir()
    for split, count in (("train", 128), ("t10k", 64)):
        labels = rng.integers(0, 2, count)
        pictures = rng.integers(0, 60, (count, 16, 16))
        for picture, label in zip(pictures, labels):
            picture[2:8, 2 + 6 * label:8 + 6 * label] += 180
        write_idx(root / f"{split}-images-idx3-ubyte.gz", pictures)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_eval_hflip_validates_selects_and_tests_with_mirror_averaging(pretrained, tmp_path):
    """On classes that are each other's mirror image, mirror averaging must wreck what the plain evaluation gets
    right; --eval-hflip changes what is measured (every recorded figure), never what is trained."""
    from leanmim.eval.finetuned import evaluate_finetuned

    data, settings = str(make_mirror_classes(tmp_path / "mirrored")), dict(UNINTERRUPTED, hflip=False)
    plain = api.finetune(pretrained, out=str(tmp_path / "plain"), data=data, **settings)
    flip = api.finetune(pretrained, out=str(tmp_path / "flip"), data=data, eval_hflip=True, **settings)
    plain_last, flip_last = (classifier_state(tmp_path / name / "checkpoints/last.ckpt") for name in ("plain", "flip"))
    assert all(torch.equal(plain_last[key], flip_last[key]) for key in plain_last)      # the same training
    assert plain["selected_val_top1"] >= 0.9 and plain["last_test_top1"] >= 0.9
    assert max(entry["val_top1"] for entry in flip["history"]) <= 0.8 and flip["last_test_top1"] <= 0.8
    assert flip["settings"]["eval_hflip"] is True and load_finetuned(tmp_path / "flip").settings.eval_hflip
    assert flip["selected_val_top1"] == evaluate_finetuned(tmp_path / "flip", "val")     # None: as fine-tuned
    assert flip["selected_val_top1"] == evaluate_finetuned(tmp_path / "flip", "val", hflip=True)
    assert flip["selected_test_top1"] == evaluate_finetuned(tmp_path / "flip", "test")
    # the flip run's selected checkpoint evaluated plain: the plain run's figure for that epoch
    selected = flip["selected_epoch"]
    assert evaluate_finetuned(tmp_path / "flip", "val", hflip=False) == plain["history"][selected - 1]["val_top1"]


def test_a_run_recorded_before_eval_hflip_existed_still_resumes(pretrained, finetuned, tmp_path):
    out = tmp_path / "older"
    api.finetune(pretrained, out=str(out), callbacks=[StopAfterEpoch(2)], **UNINTERRUPTED)
    record = json.loads((out / "run.json").read_text())
    del record["identity"]["eval_hflip"]           # what an older leanmim wrote
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(Exception, match=r"eval_hflip: False -> True"):
        api.finetune(pretrained, out=str(out), eval_hflip=True, **UNINTERRUPTED)
    resumed = api.finetune(pretrained, out=str(out), **UNINTERRUPTED)
    assert resumed["resumed_from"] and resumed["history"] == finetuned["history"]
