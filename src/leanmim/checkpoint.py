"""Reading runs and checkpoints back: the resolved config and the method with its weights.

Checkpoints are Lightning checkpoints with a ``leanmim`` entry (the resolved config as plain
data). They are always loaded with ``weights_only=True``: no arbitrary object is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, RunConfig
from .methods import MIMMethod, build_method

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
STATE_PREFIX = "method."  # the LightningModule holds the method as ``self.method``


def find_checkpoint(path: str | Path) -> Path:
    """A run directory (its last checkpoint) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_DIR / LAST_CHECKPOINT
        if not candidate.is_file():
            raise ConfigError(f"'{path}' holds no checkpoint ({CHECKPOINT_DIR}/{LAST_CHECKPOINT}): "
                              f"pass a run directory made by 'leanmim pretrain' or a .ckpt file")
        return candidate
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist: pass a run directory or a .ckpt file")
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict safely (``weights_only=True``) and check it is a leanmim one."""
    path = find_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(f"cannot read checkpoint '{path}' ({reason}): is it a leanmim checkpoint?") from None
    if not isinstance(checkpoint, dict) or "leanmim" not in checkpoint or "state_dict" not in checkpoint:
        raise ConfigError(f"'{path}' is not a leanmim checkpoint (no 'leanmim' entry)")
    return checkpoint


@dataclass
class LoadedRun:
    config: RunConfig       # resolved: every model field filled in
    method: MIMMethod       # in eval mode, weights loaded
    checkpoint_path: Path
    global_step: int
    epoch: int

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
    except RuntimeError:  # shape mismatch
        missing, unexpected = ["(shapes differ)"], []
    if missing or unexpected:
        raise ConfigError(f"checkpoint '{checkpoint_path}' does not fit the {config.method}/{config.model.name} model "
                          f"({len(missing)} missing, {len(unexpected)} unexpected weights): it was written by another version")
    method.eval()
    return LoadedRun(config, method, checkpoint_path, int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0)))
