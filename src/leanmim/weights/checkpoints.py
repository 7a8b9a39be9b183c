"""Reading runs back: a checkpoint's file, its layout check, the resolved config and the method with its weights
(:func:`load_run`), and a fine-tuning's selected classifier with its records (:func:`load_finetuned`).
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, FinetuneConfig, RunConfig
from ..files import BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT, RESULTS_FILE
from ..methods import MIMMethod, build_method
from ..parts.classifier import Classifier, prepare_encoder

STATE_PREFIX = "method."  # the LightningModule holds the method as ``self.method``


def find_checkpoint(path: str | Path) -> Path:
    """A run directory (its newest valid checkpoint, normally ``last.ckpt``) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        candidate = newest_checkpoint(path / CHECKPOINT_DIR)
        if candidate is None:
            raise ConfigError(f"'{path}' holds no readable checkpoint ({CHECKPOINT_DIR}/*.ckpt): pass a run directory "
                              f"made by 'leanmim pretrain' (or 'leanmim finetune') or a .ckpt file")
        return candidate
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist: pass a run directory or a .ckpt file")
    return path


def _load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one line that says which kind it is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):  # a class/function reference in the pickle
            raise ConfigError(f"refused to read '{path}': it holds Python objects other than tensors and plain "
                              f"containers, which leanmim never unpickles (is it a leanmim checkpoint?)") from None
        raise ConfigError(_corrupt_message(path)) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ConfigError(_corrupt_message(path)) from None


def _corrupt_message(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.name == CHECKPOINT_DIR else []
    remaining = f"; other checkpoints there: {', '.join(others)}" if others else ""
    return f"checkpoint '{path}' is truncated or corrupt (not a readable torch file){remaining}"


def _check_layout(checkpoint: Any, path: Path) -> dict:
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("leanmim"), dict) \
            or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"'{path}' is not a leanmim checkpoint (no 'leanmim' entry with a config and a state_dict)")
    entry = checkpoint["leanmim"]
    config = entry.get("config")
    if not isinstance(config, dict) or not {"method", "model", "data", "train"} <= set(config) \
            or not all(isinstance(config[key], dict) for key in ("model", "data", "train")):
        raise ConfigError(f"'{path}' has a 'leanmim' entry without a complete run config (method, model, data, "
                          f"train): it was not written by leanmim, or was edited")
    if not all(isinstance(value, torch.Tensor) for value in checkpoint["state_dict"].values()):
        raise ConfigError(f"'{path}' has a state_dict with entries that are not tensors: it is not a leanmim checkpoint")
    return checkpoint


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict safely (``weights_only=True``) and check it is a leanmim one."""
    path = find_checkpoint(path)
    return _check_layout(_load(path), path)


def checkpoint_step(path: Path) -> int | None:
    """The global step of a valid leanmim checkpoint (memory-mapped: cheap), None when unreadable or foreign."""
    try:
        checkpoint = _check_layout(_load(path, mmap=True), path)
    except ConfigError:
        return None
    return int(checkpoint.get("global_step", 0))


def newest_checkpoint(directory: Path, warn: bool = True) -> Path | None:
    """The valid checkpoint in ``directory`` with the most optimizer steps (``last.ckpt`` wins ties).

    A kill between writing ``epochNNN.ckpt`` and updating ``last.ckpt`` leaves the epoch file newer: it
    is picked. Unreadable files are skipped with a warning naming them.
    """
    if not directory.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for candidate in sorted(directory.glob("*.ckpt")):
        step = checkpoint_step(candidate)
        if step is None:
            if warn:
                warnings.warn(f"skipping unreadable checkpoint '{candidate}' (truncated, corrupt or not leanmim's)")
            continue
        key = (step, candidate.name == LAST_CHECKPOINT, candidate)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


@dataclass
class LoadedRun:
    config: RunConfig       # resolved: every model field filled in
    method: MIMMethod       # in eval mode, weights loaded
    checkpoint_path: Path
    global_step: int
    epoch: int
    unfinished: str | None = None   # None: the pretraining ran its whole schedule (or says nothing); else how far it got

    def warn_if_unfinished(self, what: str) -> None:
        """One warning when ``what`` (a probe, a fine-tune) is about to use an encoder whose pretraining stopped early."""
        if self.unfinished:
            warnings.warn(f"{what} uses '{self.checkpoint_path}', a pretraining that stopped at {self.unfinished}: its "
                          f"encoder is used as it is; run the same `leanmim pretrain` command again to finish it first")

    def untrained_method(self, seed: int) -> MIMMethod:
        """The run's method and architecture, freshly initialised from ``seed`` (as before pretraining), eval mode."""
        torch.manual_seed(seed)
        return build_method(self.config.method, self.config.model, self.config.options).eval()


def load_run(path: str | Path, expect_method: str | None = None, expect_model: str | None = None) -> LoadedRun:
    """Rebuild the method of a run and load its weights; mismatches give a one-line ConfigError."""
    checkpoint_path = find_checkpoint(path)
    checkpoint = read_checkpoint(checkpoint_path)
    if "finetune" in checkpoint["leanmim"]:
        raise ConfigError(f"'{checkpoint_path}' is a fine-tuning checkpoint: pass the pretraining run instead "
                          f"('leanmim export' accepts both)")
    config = RunConfig.from_dict(checkpoint["leanmim"]["config"], source=str(checkpoint_path))
    if expect_method and expect_method != config.method:
        raise ConfigError(f"checkpoint '{checkpoint_path}' belongs to method '{config.method}', not '{expect_method}'")
    if expect_model and expect_model != config.model.name:
        raise ConfigError(f"checkpoint '{checkpoint_path}' belongs to model '{config.model.name}', not '{expect_model}'")
    method = build_method(config.method, config.model, config.options)
    state = {key[len(STATE_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith(STATE_PREFIX)}
    try:
        missing, unexpected = method.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: name the first differing weight
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "shapes differ")
        missing, unexpected = [detail[:160]], []
    if missing or unexpected:
        raise ConfigError(f"checkpoint '{checkpoint_path}' does not fit the {config.method}/{config.model.name} model "
                          f"its config describes ({len(missing)} missing, {len(unexpected)} unexpected weights, e.g. "
                          f"{', '.join(list(missing)[:2] + list(unexpected)[:2])}): it was written by another version "
                          f"or edited")
    method.eval()
    return LoadedRun(config, method, checkpoint_path, int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0)),
                     unfinished_pretraining(checkpoint, config))


def unfinished_pretraining(checkpoint: dict, config: RunConfig) -> str | None:
    """None when ``checkpoint`` ends its pretraining schedule (or does not say); else how far it got, e.g.
    ``"step 17 of its 1638-step schedule"``. Checkpoints record their schedule's length (``total_steps``); older
    ones are judged by the epochs Lightning's loop state says were run."""
    step = checkpoint.get("global_step", 0)
    total = checkpoint["leanmim"].get("total_steps")
    if not isinstance(total, int) and config.train.max_steps > 0:
        total = config.train.max_steps
    if isinstance(total, int) and isinstance(step, int):
        return None if step >= total else f"step {step} of its {total}-step schedule"
    try:
        epochs_run = int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"])
    except (KeyError, TypeError, ValueError):
        return None
    return None if epochs_run >= config.train.epochs else f"epoch {epochs_run} of {config.train.epochs} (step {step})"


def read_finetune_entry(path: str | Path) -> dict[str, Any] | None:
    """The ``leanmim`` entry of a fine-tuning checkpoint, or None for any other file (memory-mapped: cheap)."""
    try:
        checkpoint = torch.load(find_checkpoint(path), map_location="cpu", weights_only=True, mmap=True)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - not a (zip) torch checkpoint: let the regular reader explain
        return None
    entry = checkpoint.get("leanmim") if isinstance(checkpoint, dict) else None
    return entry if isinstance(entry, dict) and "finetune" in entry else None


def selected_checkpoint(path: str | Path) -> Path:
    """A fine-tuning output directory's selected checkpoint (``checkpoints/best.ckpt``; ``last.ckpt`` only when
    no epoch has been validated yet), or the checkpoint file given."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_DIR / BEST_CHECKPOINT).is_file():
        return path / CHECKPOINT_DIR / BEST_CHECKPOINT
    return find_checkpoint(path)


@dataclass
class FinetunedRun:
    config: RunConfig            # the pretraining run's (resolved) config
    settings: FinetuneConfig
    classifier: Classifier       # in eval mode, the evaluated weights (EMA when on) loaded
    checkpoint_path: Path
    results: dict[str, Any]


def load_finetuned(path: str | Path) -> FinetunedRun:
    """Rebuild the classifier of a fine-tuning output directory (its selected checkpoint) or checkpoint file."""
    checkpoint_path = selected_checkpoint(path)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    entry = checkpoint.get("leanmim", {}) if isinstance(checkpoint, dict) else {}
    if "finetune" not in entry:
        raise ConfigError(f"'{checkpoint_path}' is not a fine-tuning checkpoint (made by 'leanmim finetune')")
    config = RunConfig.from_dict(entry["config"], source=str(checkpoint_path))
    settings = FinetuneConfig.from_dict(entry["finetune"]["settings"], source=str(checkpoint_path))
    encoder = prepare_encoder(build_method(config.method, config.model, config.options).encoder, 0.0, settings.pool)
    classifier = Classifier(encoder, entry["finetune"]["num_classes"], settings.token_drop, settings.pool)
    prefix = "ema.module." if entry["finetune"].get("weights") == "ema" else "classifier."
    state = {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    try:
        classifier.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(f"checkpoint '{checkpoint_path}' does not fit the {config.method}/{config.model.name} "
                          f"classifier: it was written by another version") from None
    results = {key: entry["finetune"].get(key) for key in ("selected_epoch", "selected_val_top1", "history")}
    results["global_step"] = int(checkpoint.get("global_step", 0))
    recorded = finetune_data_stats(checkpoint_path, "class_names") or []
    names = entry["finetune"].get("class_names") or recorded
    if len(names) != classifier.head.out_features:   # a fine-tuning made before class names were kept
        names = [str(i) for i in range(classifier.head.out_features)]
        warnings.warn(f"'{checkpoint_path}' records no class names (an older fine-tuning): classes are named by "
                      f"their index 0..{len(names) - 1}; rerun 'leanmim finetune' to keep the folder's names")
    results["class_names"] = list(names)
    results["eval_crop_pct"] = float(entry["finetune"].get("eval_crop_pct")
                                     or finetune_data_stats(checkpoint_path, "eval_crop_pct") or 1.0)
    return FinetunedRun(config, settings, classifier.eval(), checkpoint_path, results)


def finetune_data_stats(checkpoint_path: Path, key: str = "data_stats") -> Any:
    """The fine-tuning data's mean/std (or another ``key``) recorded in ``OUT/finetune.json`` ({} when absent)."""
    results = checkpoint_path.parent.parent / RESULTS_FILE
    try:
        return json.loads(results.read_text()).get(key) or {}
    except (OSError, ValueError):
        return {}


def run_data_stats(checkpoint_path: Path, config) -> tuple[list[float] | None, list[float] | None]:
    """Mean/std of the data a run was pretrained on: from its ``summary.json``, else known constants, else None."""
    summary = Path(checkpoint_path).parent.parent / "summary.json"
    try:
        dataset = json.loads(summary.read_text()).get("dataset") or {}
        if dataset.get("mean") and dataset.get("std"):
            return list(dataset["mean"]), list(dataset["std"])
    except (OSError, ValueError, AttributeError):
        pass
    from ..data import FASHION_MNIST_ALIASES, FASHION_MNIST_MEAN, FASHION_MNIST_STD

    if str(config.data.path).lower() in FASHION_MNIST_ALIASES:
        return [FASHION_MNIST_MEAN] * config.model.in_chans, [FASHION_MNIST_STD] * config.model.in_chans
    warnings.warn("the run records no data mean/std (an older run): the export's pretrained_cfg leaves them out")
    return None, None
