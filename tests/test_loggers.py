"""--logger: Lightning's own loggers by name; missing optional packages and unknown names are one-line errors."""

import importlib.util

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from leanmim.config import ConfigError
from leanmim.train.trainer import ProgressLogger, build_loggers


def test_logger_names_select_lightning_loggers(tmp_path):
    # every run also gets the ProgressLogger that keeps summary.json's progress entry current (leanmim status)
    assert [type(x) for x in build_loggers("csv,tensorboard", tmp_path)] == [CSVLogger, TensorBoardLogger, ProgressLogger]
    assert [type(x) for x in build_loggers(" CSV ", tmp_path)] == [CSVLogger, ProgressLogger]
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
