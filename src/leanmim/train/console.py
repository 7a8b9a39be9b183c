"""What a run prints: leanmim's own start summary and one progress line, and none of the libraries' chatter.

    quiet()          a context: the known third-party messages filtered at their source (warnings filters for the
                     exact messages, Lightning's info loggers at WARNING), leanmim's own warnings as one
                     ``leanmim: warning: ...`` line each. ``--verbose`` (``set_verbose(True)`` or LEANMIM_VERBOSE=1)
                     leaves everything as the libraries print it.
    start_summary()  the block printed before the first step (method, model, data, steps, precision and why, ...).
    RunProgress      a Lightning callback: one line for the whole run (step/total, loss, lr, img/s, ETA), redrawn in
                     place at most every ``TTY_REFRESH_S`` seconds on a terminal, a plain line every N steps elsewhere
                     (SLURM logs); fine-tune's evaluation passes are named validation or test.

Everything goes to stderr, so that ``--json`` output on stdout stays one JSON document.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, TextIO

from ..config import format_img_size
from .messages import leanmim_showwarning, recording_warnings
from .precision import precision_reason

_VERBOSE = False
TTY_REFRESH_S = 0.5     # a human rate: redrawing faster only flickers

# The exact third-party messages a default run shows today, as warnings-filter regexes. Each is harmless here:
THIRD_PARTY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",             # Lightning 2.6 on torch 2.10+: its own _pytree copy
    r".*is smaller than the logging interval",         # few batches per epoch: leanmim logs per step anyway
    r"Checkpoint directory .* exists and is not empty",  # the run directory is leanmim's: it resumes there
    r".*does not have many workers",                   # in-memory data is served without workers on purpose
    r".*`weights_only` was not set",                   # every leanmim load passes weights_only=True
    r".*resuming from a checkpoint that ended before the epoch ended",  # leanmim resumes mid-epoch itself
    r".*GPU available but not used",                   # --accelerator cpu is the user's choice
    r".*module\(s\) in eval mode",                     # the EMA teachers of pcae / ddae, by design
    r".*srun. command is available on your system but is not used",  # SLURM hint of Lightning
    r".*The `srun` command is available",
    r".*Found keys that are not in the model state dict but in the checkpoint",
)
# Lightning's info messages (GPU/TPU availability, litlogger / litmodels adverts, "Restoring states ...",
# "`Trainer.fit` stopped ...") go to these loggers at INFO.
THIRD_PARTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                       "lightning.pytorch", "lightning.fabric", "lightning_utilities.core.rank_zero",
                       "pytorch_lightning", "lightning_fabric")


def set_verbose(verbose: bool) -> None:
    """``--verbose``: show every library message as the library prints it."""
    global _VERBOSE
    _VERBOSE = bool(verbose)


def verbose() -> bool:
    return _VERBOSE or os.environ.get("LEANMIM_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the known third-party messages for the duration (unless verbose); restores everything after."""
    if verbose():
        yield
        return
    levels = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    with warnings.catch_warnings():
        for pattern in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        if not recording_warnings():   # not while someone records them (pytest.warns, catch_warnings(record=True))
            warnings.showwarning = leanmim_showwarning
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Drop what C++ code writes straight to file descriptor 2 (the torch profiler's kineto/CUPTI lines such as
    'gpuGetDeviceCount failed' on a machine without a GPU), unless verbose. Python's own stderr is kept: it is
    pointed at a duplicate of the original descriptor for the duration."""
    if verbose():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield
        return
    python_stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(python_stderr, "encoding", None)
                               or "utf-8", errors="replace", closefd=True)
        os.dup2(devnull, 2)
        yield
    finally:
        try:
            sys.stderr.flush()
            sys.stderr.close()
        finally:
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:g}"


def start_summary(rows: list[tuple[str, str]], title: str = "leanmim") -> str:
    """The block printed before the first step: ``title`` then one aligned ``name  value`` row each."""
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name:<{width}}  {value}" for name, value in rows])


def emit(text: str, stream: TextIO | None = None) -> None:
    """Print leanmim's own lines (stderr by default; stdout is kept for --json)."""
    stream = stream or sys.stderr
    stream.write(text + "\n")
    stream.flush()


def pretrain_summary_rows(config, method_module, data, trainer, steps_per_epoch: int, total_steps: int,
                          resume_from: Path | None, resume_step: int | None) -> list[tuple[str, str]]:
    """The start summary of a pretraining (see :func:`start_summary`)."""
    from .precision import lightning_precision

    model = config.model
    encoder = getattr(method_module, "encoder", None)
    params = count_parameters(method_module)
    encoder_params = count_parameters(encoder) if encoder is not None else None
    model_text = (f"{model.name} ({model.embed_dim} wide, {plural(model.depth, 'block')}, "
                  f"{plural(model.num_heads, 'head')}, patch "
                  f"{model.patch_size}) at {format_img_size(model.img_size)} px, {model.in_chans} channel"
                  f"{'s' if model.in_chans > 1 else ''}; {format_count(params)} parameters"
                  + (f" ({format_count(encoder_params)} in the encoder)" if encoder_params else ""))
    skipped = len(getattr(data, "skipped_files", []) or [])
    data_text = f"{config.data.path}: {data.num_images:,} images" + (f", {skipped} unreadable file(s) skipped"
                                                                      if skipped else ", none skipped")
    notes = getattr(data, "notes", None)
    batch = config.train.batch_size * trainer.world_size * config.train.accumulate_grad_batches
    epochs = (plural(config.train.epochs, "epoch") if config.train.max_steps <= 0
              else f"--max-steps {config.train.max_steps}")
    if resume_from is not None:
        resumed = f"{resume_from} (step {resume_step if resume_step is not None else '?'})"
    elif config.train.init_from:
        resumed = f"no (new run, weights from {config.train.init_from})"
    else:
        resumed = "no (new run)"
    rows = [("method", config.method), ("model", model_text), ("data", data_text)]
    if notes:
        rows += [("", note) for note in notes]
    rows += [("steps", f"{steps_per_epoch:,} per epoch, {total_steps:,} in total ({epochs}, global batch {batch})"),
             ("precision", precision_reason(config.train.precision, lightning_precision(config),
                                            config.train.accelerator)),
             ("devices", describe_devices(trainer)),
             ("run directory", str(Path(config.train.out).resolve())),
             ("resumed from", resumed)]
    return rows


def finetune_summary_rows(settings, loaded, classifier, data: str, splits, subsets, trainer, steps_per_epoch: int,
                          total_steps: int, out: Path, resume_from: Path | None, precision: str,
                          notes: list[str] = ()) -> list[tuple[str, str]]:
    """The start summary of a fine-tuning (see :func:`start_summary`): ``loaded`` the LoadedRun it starts from,
    ``classifier`` the Classifier to train, ``subsets`` the train/val/test split, ``notes`` what was adapted."""
    model, method = loaded.config.model, loaded.config.method
    if settings.from_scratch:
        source = f"none: the {method} encoder of '{loaded.checkpoint_path}' freshly initialised (--from-scratch)"
    elif settings.init_from:
        source = f"{settings.init_from} (published weights, --init-from)"
    else:
        source = f"{loaded.checkpoint_path} ({method} pretraining, step {loaded.global_step:,})"
    model_text = (f"{model.name} ({model.embed_dim} wide, {plural(model.depth, 'block')}, "
                  f"{plural(model.num_heads, 'head')}, patch "
                  f"{model.patch_size}) at {format_img_size(model.img_size)} px, {model.in_chans} channel"
                  f"{'s' if model.in_chans > 1 else ''}; {settings.pool} head, {format_count(count_parameters(classifier))}"
                  f" parameters")
    counts = subsets.counts()
    data_text = (f"{data}: {counts['num_train']:,} train, {counts['num_val']:,} validation ({subsets.val_source}), "
                 f"{counts['num_test']:,} test images; {splits.num_classes} classes")
    batch = settings.batch_size * trainer.world_size
    rows = [("source", source), ("model", model_text)] + [("", note) for note in notes] + [("data", data_text)]
    rows += [("steps", f"{steps_per_epoch:,} per epoch, {total_steps:,} in total "
                       f"({plural(settings.epochs, 'epoch')}, global "
                       f"batch {batch})"),
             ("precision", precision_reason(settings.precision, precision, settings.accelerator)),
             ("devices", describe_devices(trainer)),
             ("output directory", str(Path(out).resolve())),
             ("resumed from", str(resume_from) if resume_from is not None else "no (new fine-tuning)")]
    return rows


def plural(count: int, noun: str) -> str:
    """``1 block``, ``2 blocks``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_devices(trainer) -> str:
    accelerator = type(trainer.accelerator).__name__.replace("Accelerator", "").lower() or "cpu"
    if accelerator == "cpu":
        import torch
        what = f"cpu ({torch.get_num_threads()} threads)"
    else:
        what = f"{trainer.num_devices} × {accelerator}"
    if trainer.world_size > 1:
        what += f", {trainer.world_size} processes ({type(trainer.strategy).__name__})"
    return what


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _lightning_callback_base():
    from lightning.pytorch.callbacks import Callback
    return Callback


class RunProgress(_lightning_callback_base()):
    """One progress line for the whole run: ``step 120/1638  loss 0.412  lr 1.2e-04  310 img/s  ETA 4:51``.

    On a terminal the line is redrawn in place at most every ``TTY_REFRESH_S`` seconds (and at the last step);
    elsewhere (a log file, SLURM) one plain line is printed every ``every_steps`` optimizer steps and at the last.
    The loss shown is the mean over the steps since the line was last drawn (summed on the device: no
    synchronisation per step). Evaluation passes (fine-tune) show as ``validation`` or ``test``.
    """

    def __init__(self, every_steps: int = 10, stream: TextIO | None = None, tty: bool | None = None):
        super().__init__()
        self.every_steps = max(1, int(every_steps))
        self.stream = stream
        self.tty = tty
        self._reset()

    def _reset(self) -> None:
        self._timing_from: tuple[float, int] | None = None   # (time, global step) after the first batch
        self._images = 0
        self._last_draw = 0.0
        self._last_step_drawn = -1
        self._loss_sum = None
        self._loss_count = 0
        self._width = 0
        self.lines: list[str] = []   # every line drawn (tests read them)

    @property
    def out(self) -> TextIO:
        return self.stream or sys.stderr

    def is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        try:
            return self.out.isatty()
        except (AttributeError, ValueError):
            return False

    @staticmethod
    def total_steps(trainer, module) -> int:
        total = getattr(module, "total_steps", None)
        if trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps
        return int(total or 0)

    def on_train_start(self, trainer, module) -> None:
        self._reset()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self._timing_from is None:  # rates and ETA from the end of the first batch: it pays the start-up costs
            self._timing_from = (time.perf_counter(), trainer.global_step)
        else:
            self._images += len(images) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "detach"):
            value = loss.detach().float()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        step, total = trainer.global_step, self.total_steps(trainer, module)
        now = time.perf_counter()
        last = total > 0 and step >= total
        if step == self._last_step_drawn:
            return
        if self.is_tty():
            due = now - self._last_draw >= TTY_REFRESH_S or last
        else:
            due = step % self.every_steps == 0 or last
        if due:
            self.draw(self.train_line(trainer, step, total, now), final=last)
            self._last_draw, self._last_step_drawn = now, step

    def train_line(self, trainer, step: int, total: int, now: float) -> str:
        parts = [f"step {step:,}/{total:,}" if total else f"step {step:,}"]
        if self._loss_count:
            parts.append(f"loss {float(self._loss_sum) / self._loss_count:.4f}")
            self._loss_sum, self._loss_count = None, 0
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        start_time, start_step = self._timing_from or (now, step)
        elapsed, done = now - start_time, step - start_step
        if elapsed > 0 and done > 0:
            parts.append(f"{self._images / elapsed:,.0f} img/s")
            if total:
                parts.append(f"ETA {format_duration((total - step) * elapsed / done)}")
        parts.append(f"epoch {trainer.current_epoch + 1}")
        return "  ".join(parts)

    def draw(self, line: str, final: bool = False) -> None:
        self.lines.append(line)
        try:
            if self.is_tty():
                padding = " " * max(0, self._width - len(line))
                self.out.write("\r" + line + padding + ("\n" if final else ""))
                self._width = 0 if final else len(line)
            else:
                self.out.write(line + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass

    def end_line(self) -> None:
        """On a terminal, end the line being redrawn so that the next print starts on its own."""
        if self.is_tty() and self._width:
            self.draw(self.lines[-1] if self.lines else "", final=True)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            self.end_line()

    def on_exception(self, trainer, module, exception) -> None:
        if trainer.is_global_zero:
            self.end_line()

    def on_validation_start(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        self._history_length = len(getattr(module, "history", []) or [])
        if self.is_tty():  # a pass can take a while: say which one runs
            label = "testing" if getattr(module, "eval_split", "val") == "test" else "validating"
            current = self.lines[-1] if (self.lines and self._width) else ""
            self.draw(f"{current}  ({label} …)" if current else f"{label} …")

    def on_validation_end(self, trainer, module) -> None:
        """Fine-tune: one line per evaluated pass, named by its split (never Lightning's "Validation DataLoader 0")."""
        if not trainer.is_global_zero:
            return
        top1 = getattr(module, "last_eval_top1", None)
        if top1 is None:
            return
        if getattr(module, "eval_split", "val") == "test":
            weights = f"checkpoint {Path(trainer.ckpt_path).name}" if trainer.ckpt_path else "last weights"
            count = getattr(trainer.val_dataloaders, "dataset", None)
            count = f", {len(count):,} images" if count is not None else ""
            self.draw(f"test top-1 {100 * top1:.2f}% ({weights}{count})", final=True)
        elif len(getattr(module, "history", []) or []) > getattr(self, "_history_length", 0):
            self.end_line()
            self.draw(f"epoch {trainer.current_epoch + 1}: validation top-1 {100 * top1:.2f}%", final=True)
