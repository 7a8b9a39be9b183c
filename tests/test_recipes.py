"""The released recipes' defaults in a real training run (docs/methods.md, differences from the released code)."""

from __future__ import annotations

import signal

import pytest
import torch

from conftest import assert_same_training_state, tiny_run_config
from leanmim.train.pretrain import pretrain
from leanmim.train.trainer import TrainingInterrupted
from test_runs import SendSignalAtStep


def test_pcae_drop_path_draws_resume_exactly(tiny_data, tmp_path, single_thread):
    """PCAE trains with its released drop path by default (0.25 in the student encoder and in every decoder block;
    draws from torch's global generator). Interrupted after step 4 of 8 and resumed, the run ends with every
    tensor — student, decoder, EMA teacher, optimizer state — equal to the uninterrupted run's."""
    def config(out):
        return tiny_run_config(tiny_data, out, method="pcae", epochs=2, checkpoint_every_steps=2)

    pretrain(config(tmp_path / "whole"))
    split = tmp_path / "split"
    with pytest.raises(TrainingInterrupted):
        pretrain(config(split), callbacks=[SendSignalAtStep(3, signal.SIGTERM)])
    assert torch.load(split / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    pretrain(config(split))
    whole = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)
    decoder_drop = [key for key in whole["state_dict"] if key.startswith("method.decoder.")]
    assert decoder_drop and any(key.startswith("method.teacher.") for key in whole["state_dict"])
    assert_same_training_state(tmp_path / "whole/checkpoints/last.ckpt", split / "checkpoints/last.ckpt")


def test_pcae_drop_path_changes_training(tiny_data, tmp_path, single_thread):
    """The default (0.25) is not a no-op: the same run with --drop-path 0 --decoder-drop-path 0 ends elsewhere."""
    default = tiny_run_config(tiny_data, tmp_path / "default", method="pcae", epochs=1)
    without = tiny_run_config(tiny_data, tmp_path / "without", method="pcae", epochs=1)
    without.model.drop_path, without.model.decoder_drop_path = 0.0, 0.0
    pretrain(default)
    pretrain(without)
    state = lambda run: torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]  # noqa: E731
    a, b = state(tmp_path / "default"), state(tmp_path / "without")
    assert not torch.equal(a["method.decoder.head.weight"], b["method.decoder.head.weight"])


def test_ema_update_after_step_k_gets_progress_k_over_k(tiny_data, tmp_path, single_thread, monkeypatch):
    """The training module hands the method the progress of the step just taken (k/K, what its forward saw), so the
    teacher's momentum follows the released cosine schedule indexed from step 0."""
    from leanmim.methods.pcae import PCAE

    seen, original = [], PCAE.after_optimizer_step
    monkeypatch.setattr(PCAE, "after_optimizer_step", lambda self, p: (seen.append(p), original(self, p))[1])
    pretrain(tiny_run_config(tiny_data, tmp_path / "run", method="pcae", epochs=2))
    assert seen == [k / 8 for k in range(8)]
