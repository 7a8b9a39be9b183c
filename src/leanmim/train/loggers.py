"""What a run logs and where: leanmim's progress record (``summary.json`` while it trains, read by ``leanmim status``),
and Lightning's loggers (CSV, TensorBoard, wandb, MLflow) with one log per run that every resume continues.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from ..config import ConfigError
from ..files import temporary_path
from .run import write_summary
LOGGER_EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}


class ContinuedCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing a run's ``metrics.csv`` instead of deleting it (Lightning's writer removes
    the file when its directory is not empty): the rows of steps up to ``resume_step`` are kept, those after it
    (steps trained again after a crash, or a failed earlier start's) are dropped, so the file reads as one run."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        try:
            with open(path, newline="") as file:
                reader = csv.DictReader(file)
                header, rows = list(reader.fieldnames or []), list(reader)
        except (OSError, csv.Error, UnicodeDecodeError):
            header, rows = [], []   # unreadable: the run's log starts again here
        kept = [row for row in rows if _step_of(row) is not None and _step_of(row) < self.resume_step]
        self.metrics_keys = sorted(header)
        rewritten = temporary_path(path)
        with open(rewritten, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(rewritten, path)


def _step_of(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger with one log per run, ``logs/metrics.csv``, continued by every resume (see
    :class:`ContinuedCSVWriter`); ``resume_step`` (the resumed checkpoint's step, 0 for a new run) is set by the task
    before the first metric is logged."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, name="logs", version="")
        self.resume_step = 0

    @property
    def experiment(self) -> ContinuedCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedCSVWriter(self.log_dir, self.resume_step)
        return self._experiment


def continue_logs(trainer: L.Trainer, resumed_step: int) -> None:
    """Tell the run's CSV log which step the run resumes from (0: a new run), before anything is logged."""
    for logger in trainer.loggers:
        if isinstance(logger, RunCSVLogger):
            logger.resume_step = resumed_step


def build_loggers(names: str, run_dir: Path) -> list:
    """Lightning's own loggers by name: csv (RUN_DIR/logs), tensorboard (RUN_DIR/tensorboard), wandb (offline in
    RUN_DIR/wandb unless WANDB_MODE=online), mlflow (a local store RUN_DIR/mlruns unless MLFLOW_TRACKING_URI is set)."""
    import importlib.util

    chosen = [name.strip().lower() for name in str(names).split(",") if name.strip()]
    unknown = [name for name in chosen if name not in ("csv", "tensorboard", "wandb", "mlflow")]
    if unknown or not chosen:
        raise ConfigError(f"--logger: unknown logger '{', '.join(unknown) or names}': choose from csv, tensorboard, "
                          f"wandb, mlflow (comma-separated)")
    for name in chosen:
        if name in LOGGER_EXTRAS and importlib.util.find_spec(LOGGER_EXTRAS[name]) is None:
            raise ConfigError(f"--logger {name} needs the {LOGGER_EXTRAS[name]} package: pip install 'leanmim[{name}]'")
    loggers = []
    for name in dict.fromkeys(chosen):
        if name == "csv":
            loggers.append(RunCSVLogger(run_dir))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger
            loggers.append(WandbLogger(name=run_dir.name, save_dir=str(run_dir), project="leanmim",
                                       offline=os.environ.get("WANDB_MODE", "offline") != "online"))
        else:
            from lightning.pytorch.loggers import MLFlowLogger
            loggers.append(MLFlowLogger(experiment_name="leanmim", run_name=run_dir.name,
                                        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI",
                                                                    (run_dir / "mlruns").resolve().as_uri())))
    return [*loggers, ProgressLogger(run_dir)]


class ProgressLogger(Logger):
    """Keeps ``RUN_DIR/summary.json``'s ``progress`` entry current for ``leanmim status``: written when training
    starts, at every logging step (at most every 2 s) and at the end — process id and host, step, total steps,
    epoch, last loss, img/s, steps/s and the state (running, stopped, failed). Lightning hands each logger the
    module once at the start (``log_graph``), which gives the schedule's length. Global rank zero only."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir, self.module, self.progress = Path(run_dir), None, {}
        self._written_at = 0.0
        self._first: tuple[float, int] | None = None   # (time, step) of the first logged step of this session

    @property
    def name(self) -> str:
        return "progress"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_graph(self, model, input_array=None) -> None:
        import socket

        self.module = model
        self.progress = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write(force=True)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = time.time()
        step = int(step if step is not None else 0) + 1   # Lightning logs step s for the (s + 1)-th optimizer step
        if self._first is None:
            self._first = (now, step)
        elif step > self._first[1]:
            self.progress["steps_per_second"] = round((step - self._first[1]) / (now - self._first[0]), 4)
        loss = metrics.get("loss_step", metrics.get("loss"))
        if loss is not None:
            self.progress["loss"] = float(loss)
        if metrics.get("img_per_s") is not None:
            self.progress["images_per_second"] = round(float(metrics["img_per_s"]), 1)
        if "loss_step" in metrics or "lr" in metrics:   # a training step's row (validation rows carry the step count)
            self.progress["step"] = max(step, self.progress.get("step", 0))
        self._write()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.progress["state"] = "stopped" if status == "success" else status
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        if not force and time.time() - self._written_at < 2.0:
            return
        module = self.module
        if module is not None and getattr(module, "_trainer", None) is not None:
            self.progress.update(step=max(int(module.global_step), self.progress.get("step", 0)),
                                 epoch=int(module.current_epoch), total_steps=int(getattr(module, "total_steps", 0)))
        self.progress["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._written_at = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_summary(self.run_dir, {"progress": dict(self.progress)})
