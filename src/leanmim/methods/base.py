"""What every method shares: its output type, its base class and the registry by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, dataclass_from_dict
from ..parts.encoder import ViTEncoder
from ..parts.tokens import BatchRandom


@dataclass
class MethodOutput:
    """One training forward pass.

    loss:        scalar to minimise
    logs:        extra scalars worth logging (detached)
    predictions: (B, L, p²·C) normalized-pixel predictions in grid order, where the method makes them
    mask:        (B, L) 1 = the patch was hidden from the encoder
    """

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    predictions: Tensor | None = None
    mask: Tensor | None = None


class MIMMethod(nn.Module):
    """Base class: a method owns an ``encoder`` (what gets exported) plus whatever it trains with.

    Subclasses set ``name``, ``Options`` (a dataclass of typed, documented options) and ``summary``,
    and implement ``forward``. Method files hold the method only: no devices, loops or I/O.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    encoder: ViTEncoder

    def __init__(self, model: ModelConfig, options: Any):
        super().__init__()
        self.model_config = model.with_method_defaults(self.name)   # drop path left unset: the method's recipe
        self.options = options

    def forward(self, images: Tensor, progress: float = 0.0, rng: BatchRandom | None = None) -> MethodOutput:
        """images: (B, C, H, W) normalized; progress: fraction of training done, in [0, 1]."""
        raise NotImplementedError

    def after_optimizer_step(self, progress: float) -> None:
        """Called once after each optimizer step (not per accumulated micro-batch), e.g. for EMA teachers.

        progress: k / K for step k of K (k from 0), the fraction of training done *before* this step — the
        ``progress`` its forward saw — so a cosine momentum schedule is the released one (``teacher.py``).
        """

    def teacher_modules(self) -> list[nn.Module]:
        """Sub-modules that are never trained by gradient (excluded from the optimizer)."""
        return []


METHODS: dict[str, type[MIMMethod]] = {}


def register_method(cls: type[MIMMethod]) -> type[MIMMethod]:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[MIMMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_options(method: str, values: dict[str, Any]) -> Any:
    """The method's typed options from a mapping (unknown keys and bad values raise ConfigError)."""
    return dataclass_from_dict(method_class(method).Options, values, f"options of method '{method}'")


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def build_method(method: str, model: ModelConfig, options: dict[str, Any]) -> MIMMethod:
    """Instantiate a registered method for a resolved model configuration."""
    return method_class(method)(model, build_options(method, options))


def check_ratio(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value}")

