"""A fine-tuning's start-up: published weights with the head count the file does not state (--num-heads), one load
line, another resolution than the pretraining's (--img-size, the position table resized as when loading), and the
start summary printed once before the first step."""

import warnings

import lightning as L
import pytest
import timm
import torch

from conftest import tiny_run_config
from leanmim import api
from leanmim.cli import main
from leanmim.config import ConfigError
from leanmim.train.pretrain import pretrain
from leanmim.weights import load_finetuned, load_run, resized_table, run_from_weights

FAST = dict(epochs=1, batch_size=32, lr=3e-3, drop_path=0.0, precision="32", progress_bar=False, log_every_steps=1)
SUMMARY_ROWS = ("source", "model", "data", "steps", "precision", "devices", "output directory", "resumed from")

pytestmark = pytest.mark.usefixtures("single_thread")


class KeepStartTable(L.Callback):
    """Keeps a copy of the encoder's position table (L, D) as training starts (before any step moves it)."""

    def on_fit_start(self, trainer, module):
        self.table = module.classifier.encoder.pos_embed.detach().clone()


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    """A 16-px, patch-4 (4×4 grid), 32-wide MAE run of one epoch."""
    run = tmp_path_factory.mktemp("startup") / "run"
    pretrain(tiny_run_config(tiny_data, run, epochs=1))
    return run


@pytest.fixture(scope="module")
def six_head_timm_file(tmp_path_factory):
    """A timm ViT (32 wide, 4 heads, 16 px, patch 4, grayscale) saved as a plain state dict: the file does not
    state its heads. Returns (path, the timm model)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                            embed_dim=32, depth=2, num_heads=4, num_classes=0).eval()
    with torch.no_grad():
        for parameter in vit.parameters():   # not the init: biases and tables nonzero, so heads matter everywhere
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("published") / "vit4.pth"
    torch.save(vit.state_dict(), path)
    return path, vit


def summary_blocks(text):
    """The start summaries in ``text``: each a list of its lines (title first)."""
    lines = text.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        if line.startswith("fine-tuning (leanmim "):
            block = [line]
            for row in lines[number + 1:]:
                if not row.startswith("  "):
                    break
                block.append(row)
            blocks.append(block)
    return blocks


def rows(block):
    """[(name, value)] of a summary block; a continuation row (a note) has the name ''."""
    parsed = []
    for line in block[1:]:
        name, _, value = line[2:].partition("  ") if line[2] != " " else ("", "", line)
        parsed.append((name.strip(), value.strip()))
    return parsed


def row(block, name):
    return next(value for key, value in rows(block) if key == name)


def test_num_heads_gives_the_files_function_and_one_load_line(six_head_timm_file, tiny_data):
    path, vit = six_head_timm_file
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        theirs = vit.forward_features(images)
    with pytest.warns(UserWarning) as caught:
        given = run_from_weights(path, str(tiny_data), num_heads=4)
    loads = [str(w.message) for w in caught if "--init-from" in str(w.message)]
    assert len(loads) == 1 and loads[0].startswith(f"--init-from: loaded encoder from '{path}' (timm layout)")
    assert "encoder heads: 4 from --num-heads" in loads[0]
    with pytest.warns(UserWarning, match=r"does not state its encoder heads: 1 assumed \(override with --num-heads\)"):
        assumed = run_from_weights(path, str(tiny_data))   # no preset of width 32: width / 64 → 1 head
    assert given.config.model.num_heads == given.method.encoder.blocks[0].attn.num_heads == 4
    with torch.no_grad():
        ours, wrong = given.method.encoder.forward_features(images), assumed.method.encoder.forward_features(images)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (wrong - theirs).abs().max() > 1e-2          # the same tensors read with the wrong head count
    with pytest.raises(ConfigError, match=r"--num-heads 5 does not divide the 32-d width of '.*vit4.pth'"):
        run_from_weights(path, str(tiny_data), num_heads=5)
    with pytest.warns(UserWarning, match=r"encoder position table resized from a 4×4 to a 6×6 grid by timm's "):
        larger = run_from_weights(path, str(tiny_data), num_heads=4, img_size=24)   # a timm file: timm's rule
    assert larger.config.model.img_size == 24 and larger.method.encoder.pos_embed.shape == (36, 32)


def test_finetune_init_from_takes_num_heads(six_head_timm_file, tiny_data, tmp_path, capsys):
    path, _ = six_head_timm_file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = api.finetune(None, init_from=str(path), data=str(tiny_data), num_heads=4,
                               out=str(tmp_path / "ft"), **FAST)
    assert results["epochs_completed"] == 1
    assert len([w for w in caught if str(w.message).startswith("--init-from: loaded encoder")]) == 1
    classifier = load_finetuned(tmp_path / "ft").classifier
    assert classifier.encoder.blocks[0].attn.num_heads == 4
    (block,) = summary_blocks(capsys.readouterr().err)
    assert row(block, "source") == f"{path} (published weights, --init-from)"
    assert "4 heads" in row(block, "model")
    # another head count is another fine-tuning: refused in the same directory
    with pytest.raises(ConfigError, match=r"num_heads: 4 -> 2"):
        api.finetune(None, init_from=str(path), data=str(tiny_data), num_heads=2, out=str(tmp_path / "ft"), **FAST)
    capsys.readouterr()
    assert main(["finetune", "--init-from", str(path), "--data", str(tiny_data), "--num-heads", "5",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanmim: error: --num-heads 5 does not divide the 32-d width") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_num_heads_on_a_run_must_agree_with_the_run(pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"states its 2 encoder heads: --num-heads is for --init-from"):
        api.finetune(pretrained, num_heads=4, out=str(tmp_path / "ft"), **FAST)
    assert not (tmp_path / "ft").exists()


def test_finetune_at_another_img_size_resizes_the_table_as_loading_does(pretrained, tmp_path, capsys):
    """A 16-px pretraining (patch 4: a 4×4 grid) fine-tuned at 24 px (6×6): the table it starts from is
    resized_table's of the run's, the data are read at 24 px, and the size is part of the fine-tuning's identity."""
    original = load_run(pretrained).method.encoder.pos_embed                        # (16, 32)
    with_cls = torch.cat([torch.zeros(1, 32), original]).unsqueeze(0)
    expected = resized_table(with_cls, (6, 6), "t", [], "timm")[0, 1:]               # (36, 32)
    start = KeepStartTable()
    out = tmp_path / "ft24"
    results = api.finetune(pretrained, img_size=24, out=str(out), callbacks=[start], **FAST)
    assert start.table.shape == (36, 32) and torch.equal(start.table, expected)
    assert results["epochs_completed"] == 1 and results["last_test_top1"] is not None
    finetuned = load_finetuned(out)
    assert finetuned.config.model.img_size == 24 and finetuned.classifier.encoder.pos_embed.shape == (36, 32)
    assert finetuned.classifier(torch.zeros(2, 1, 24, 24)).shape == (2, 2)
    (block,) = summary_blocks(capsys.readouterr().err)
    assert " at 24 px," in row(block, "model")
    assert any("resized from a 4×4 to a 6×6 grid" in line for line in block)
    with pytest.raises(ConfigError, match=r"img_size: 24 -> 32"):
        api.finetune(pretrained, img_size=32, out=str(out), **FAST)
    with pytest.raises(ConfigError, match=r"image size 26 is not divisible by patch size 4"):
        api.finetune(pretrained, img_size=26, out=str(tmp_path / "odd"), **FAST)


def test_start_summary_once_before_the_first_step_and_on_resume(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    api.finetune(pretrained, out=str(out), **{**FAST, "epochs": 2, "progress_bar": True},
                 callbacks=[StopAfterFirstEpoch()])
    err = capsys.readouterr().err
    (block,) = summary_blocks(err)
    assert err.index("fine-tuning (leanmim ") < err.index("step 1/6")   # before the first step's line
    assert [name for name, _ in rows(block) if name] == list(SUMMARY_ROWS)
    assert not any(line.startswith("leanmim") for line in block)     # tests count "leanmim..." lines as messages
    assert row(block, "source") == f"{load_run(pretrained).checkpoint_path} (mae pretraining, step 4)"
    assert row(block, "data").startswith(f"{load_run(pretrained).config.data.path}: 115 train, 13 validation (")
    assert row(block, "data").endswith("), 64 test images; 2 classes")
    assert row(block, "steps") == "3 per epoch, 6 in total (2 epochs, global batch 32)"
    assert row(block, "precision") == "fp32: --precision 32"
    assert row(block, "output directory") == str(out.resolve())
    assert row(block, "resumed from") == "no (new fine-tuning)"
    api.finetune(pretrained, out=str(out), **{**FAST, "epochs": 2})
    (block,) = summary_blocks(capsys.readouterr().err)
    assert row(block, "resumed from").endswith("last.ckpt")


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


@pytest.mark.parametrize("source, target", [(3, 1), (1, 3), (2, 3), (3, 2)])
def test_patch_embedding_channels_adapted_by_timms_rule(source, target):
    """By hand, and equal to timm's own adapt_input_conv where it takes base_chans (1.0.23 does not)."""
    from leanmim.weights.load import adapted_input_conv

    weight = torch.randn(8, source, 4, 4)
    adapted = adapted_input_conv(weight, target)
    if target == 1:
        assert torch.allclose(adapted, weight.sum(1, keepdim=True))     # grey = the colours' sum
    else:                                                              # channels repeated, scaled by source / target
        assert torch.allclose(adapted, torch.cat([weight] * 3, 1)[:, :target] * source / target)
    try:
        from timm.models._manipulate import adapt_input_conv
        expected = adapt_input_conv(target, weight, base_chans=source)
    except TypeError:
        pytest.skip("this timm's adapt_input_conv has no base_chans")
    assert torch.equal(adapted, expected)
