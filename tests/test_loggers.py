"""--logger: Lightning's own loggers by name; missing optional packages and unknown names are one-line errors."""

import importlib.util

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from leanmim.config import ConfigError
from leanmim.train.loggers import ProgressLogger, RunCSVLogger, build_loggers


def test_logger_names_select_lightning_loggers(tmp_path):
    # every run also gets the ProgressLogger that keeps summary.json's progress entry current (leanmim status)
    assert [type(x) for x in build_loggers("csv,tensorboard", tmp_path)] == [RunCSVLogger, TensorBoardLogger, ProgressLogger]
    assert [type(x) for x in build_loggers(" CSV ", tmp_path)] == [RunCSVLogger, ProgressLogger]
    with pytest.raises(ConfigError, match="unknown logger 'neptune'"):
        build_loggers("csv,neptune", tmp_path)


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_optional_loggers_offline_or_a_clear_error(tmp_path, name, monkeypatch):
    if importlib.util.find_spec(name) is None:
        with pytest.raises(ConfigError, match=rf"pip install 'leanmim\[{name}\]'"):
            build_loggers(f"csv,{name}", tmp_path)
        return
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = build_loggers(name, tmp_path)[0]
    logger.log_metrics({"loss": 1.0}, step=0)   # offline / local store: no server needed
    logger.finalize("success")


def csv_rows(run) -> list[dict]:
    import csv

    with open(run / "logs" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return [{key: value for key, value in row.items() if key not in ("img_per_s",) and value != ""} for row in rows]


def test_a_resumed_run_continues_its_csv_log_as_one_run(tiny_data, tmp_path, single_thread):
    """Lightning's CSV writer deletes a non-empty log directory's metrics.csv when it starts: a resumed run would
    keep only its own rows. The run's log is continued instead, and reads as the uninterrupted run's."""
    import signal

    from conftest import tiny_run_config
    from leanmim.train.pretrain import pretrain
    from leanmim.train.trainer import TrainingInterrupted
    from test_runs import SendSignalAtStep

    pretrain(tiny_run_config(tiny_data, tmp_path / "whole", logger="csv"))
    with pytest.raises(TrainingInterrupted):
        pretrain(tiny_run_config(tiny_data, tmp_path / "split", logger="csv"),
                 callbacks=[SendSignalAtStep(5, signal.SIGTERM)])
    assert 0 < len(csv_rows(tmp_path / "split")) < len(csv_rows(tmp_path / "whole"))
    pretrain(tiny_run_config(tiny_data, tmp_path / "split", logger="csv"))
    whole, split = csv_rows(tmp_path / "whole"), csv_rows(tmp_path / "split")
    steps = [[row for row in rows if "loss_step" in row] for rows in (whole, split)]
    assert [row["step"] for row in steps[1]] == [str(step) for step in range(8)]
    assert steps[1] == steps[0]   # every step's row once, with the uninterrupted run's values
    # an epoch's mean (loss_epoch) covers the steps of the session that finished the epoch: not compared


def test_rows_past_the_resumed_checkpoint_are_dropped(tmp_path):
    """After a kill -9 the log can hold rows of steps the resumed run trains again: they are dropped on resume."""
    from leanmim.train.loggers import RunCSVLogger

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("epoch,loss_step,step\n0,1.0,0\n0,0.9,1\n0,0.8,2\n0,0.7,3\n")
    logger = RunCSVLogger(tmp_path)
    logger.resume_step = 2            # the newest checkpoint was written after 2 optimizer steps
    logger.log_metrics({"loss_step": 0.75, "epoch": 0}, step=2)
    logger.save()
    assert (tmp_path / "logs" / "metrics.csv").read_text().splitlines() == [
        "epoch,loss_step,step", "0,1.0,0", "0,0.9,1", "0,0.75,2"]


def test_progress_counts_training_steps_not_validation_rows(tmp_path):
    """Lightning logs training step s as step s (the (s + 1)-th optimizer step) and a validation after 9 steps as
    step 9: the progress record (leanmim status) must say 9 steps, not 10."""
    import json

    from leanmim.train.loggers import ProgressLogger

    progress = ProgressLogger(tmp_path)
    for step in range(9):
        progress.log_metrics({"loss_step": 1.0, "lr": 1e-3}, step=step)
    progress.log_metrics({"val_top1": 0.5}, step=9)
    progress._write(force=True)
    assert json.loads((tmp_path / "summary.json").read_text())["progress"]["step"] == 9
