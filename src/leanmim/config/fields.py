"""What every setting is made of: ConfigError, ``option()`` (a field with its help and flag), value coercion.

Every field is also a CLI flag: ``--field-name`` (``model.name`` is ``--model``, ``data.path`` is ``--data``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad setting; its message is one line that says what is wrong and how to fix it."""


def option(default: Any, help: str, cli: str | None = None, choices: tuple | None = None):
    """A config field with a one-line meaning (shown by ``--help`` and ``leanmim methods``)."""
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices})


def launched_by_cluster() -> bool:
    """Whether this process was started by torchrun (``WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``) or by SLURM's srun
    (``SLURM_NTASKS`` and ``SLURM_PROCID``): the launchers Lightning detects for multi-node runs."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or "WORLD_SIZE" in env or ("SLURM_NTASKS" in env and "SLURM_PROCID" in env)


def as_user_meant(path: str | None) -> str | None:
    """A path the user typed, made absolute against the current directory when it names something on disk (or a
    shard pattern in an existing directory), so that a run's ``config.yaml`` works from any directory; names such
    as ``fashion-mnist`` and URLs are kept as typed. ``~`` is expanded."""
    if path is None or "://" in str(path):
        return path
    expanded = os.path.expanduser(str(path))
    parent = os.path.dirname(expanded)
    if os.path.exists(expanded) or (parent and os.path.isdir(parent)):
        return os.path.abspath(expanded)
    return path


class ImageSize:
    """The type of an image-size setting: ``224`` (square) or height × width, ``64x96`` on the command line and
    ``[64, 96]`` (or ``64x96``) in YAML, as timm's and transformers' ``img_size=(64, 96)``. Its values are an int
    for a square and a list ``[height, width]`` otherwise (:func:`parse_img_size`); :func:`image_hw` reads either."""


def parse_img_size(value: Any, name: str = "img_size") -> int | list[int]:
    """``value`` (an int, ``"64"``, ``"64x96"``, ``"64,96"``, ``[64, 96]``) as an image size: an int when square,
    else ``[height, width]``; a one-line ConfigError for anything else (a third side, a fraction, a word)."""
    sides: Any = value
    if isinstance(value, str):
        text = value.strip().strip("[]()").lower().replace(",", "x").replace("×", "x")   # "[64, 96]": a metadata value
        sides = [part.strip() for part in text.split("x")]
    elif not isinstance(value, (list, tuple)):
        sides = [value]
    try:
        if not 1 <= len(sides) <= 2 or any(isinstance(side, bool) or (isinstance(side, float) and not side.is_integer())
                                           for side in sides):
            raise ValueError
        numbers = [int(side) for side in sides]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a size in pixels, N (square) or HEIGHTxWIDTH such as 64x96, got "
                          f"{value!r}") from None
    if any(side < 1 for side in numbers):
        shown = "x".join(map(str, numbers))
        raise ConfigError(f"{name} must be a positive integer, got {shown}: use N (square) or HEIGHTxWIDTH such as 64x96")
    return numbers[0] if len(numbers) == 1 or numbers[0] == numbers[1] else numbers


def image_hw(img_size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image size (an int is a square)."""
    if isinstance(img_size, (list, tuple)):
        return int(img_size[0]), int(img_size[1])
    return int(img_size), int(img_size)


def format_img_size(img_size: int | list[int] | tuple[int, int]) -> str:
    """``224`` or ``64x96`` (height x width), as the command line takes it."""
    height, width = image_hw(img_size)
    return str(height) if height == width else f"{height}x{width}"


def field_type(annotation: Any) -> type:
    """The concrete scalar type of a field annotation such as ``int | None``."""
    if isinstance(annotation, str):  # annotations are strings under `from __future__`
        annotation = eval(annotation, {"typing": typing, "ImageSize": ImageSize})
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert ``value`` to the field's type, or raise a one-line ConfigError."""
    kind = field_type(annotation)
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
    elif kind is ImageSize:
        return parse_img_size(value, name)
    elif kind is tuple or kind is list:
        return list(value) if isinstance(value, (list, tuple)) else [int(v) for v in str(value).split(",") if v]
    else:
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")


def dataclass_from_dict(cls: type, values: dict[str, Any], source: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and checking types and choices."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(fields)}")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = coerce(value, fields[key].type, f"{source}.{key}")
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{source}.{key}: '{kwargs[key]}' is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)
