"""Real signals at the awkward moments (issue 29 §5): a second Ctrl-C stops at once with leanmim's line and saves
nothing; a SIGTERM during a fine-tune's last validation stops it before its test evaluation, and the rerun
finishes the fine-tune exactly."""

from __future__ import annotations

import os
import signal
import time

import lightning as L
import pytest

from conftest import tiny_run_config
from leanmim import api
from leanmim.train.pretrain import pretrain
from leanmim.train.trainer import TrainingInterrupted

pytestmark = pytest.mark.usefixtures("single_thread")


class DoubleInterrupt(L.Callback):
    """At the start of step ``step``: Ctrl-C, then a second one while the first is still being honoured."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)      # the first is handled here (Python runs handlers between bytecodes)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


def test_a_second_ctrl_c_stops_at_once_and_saves_nothing(tiny_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="second SIGINT: stopped at once, nothing saved") as stopped:
        pretrain(tiny_run_config(tiny_data, run, epochs=2, checkpoint_every_epochs=0),
                 callbacks=[DoubleInterrupt(2)])
    assert stopped.value.exit_code == 130
    assert not list(run.glob("checkpoints/*.ckpt"))   # step 2 is inside epoch 0: no checkpoint was due yet
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # leanmim's handler is gone


class TermDuringLastValidation(L.Callback):
    def __init__(self, epochs: int):
        self.epochs, self.sent = epochs, False

    def on_validation_start(self, trainer, module):
        if trainer.state.fn == "fit" and trainer.current_epoch == self.epochs - 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_a_finetunes_last_validation_stops_before_its_test_evaluation(tiny_data, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_run_config(tiny_data, run, max_steps=2))
    settings = dict(out=str(tmp_path / "ft"), epochs=2, batch_size=32, precision="32", progress_bar=False,
                    drop_path=0.0)
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGTERM") as stopped:
        api.finetune(run, callbacks=[TermDuringLastValidation(2)], **settings)
    assert stopped.value.exit_code == 143
    import json
    recorded = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert recorded["selected_test_top1"] is None and recorded["last_test_top1"] is None   # the test split unread
    resumed = api.finetune(run, **settings)
    whole = api.finetune(run, **{**settings, "out": str(tmp_path / "whole")})
    assert resumed["selected_test_top1"] is not None
    for key in ("selected_epoch", "selected_val_top1", "selected_test_top1", "last_test_top1"):
        assert resumed[key] == whole[key], key
